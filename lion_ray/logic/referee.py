"""Reading the referee's reviews and turning both-order scores into the hard/easy split.

The referee sees every (teacher, student) pair twice: order A puts the teacher's answer
first, order B the student's. Each review must end with two score lines; a review whose
scores cannot be read is never guessed (the original code scored it -1 and averaged it
in): the caller re-asks, and rows still unreadable are labelled ``unparsed`` and left out
of the split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = r"(?P<score{n}>\d+(?:\.\d+)?)"
_SCORE_LINE = (
    r"score\s+(?:of|for)\s+(?:the\s+)?assistant\s*{n}\s*"  # Score of the Assistant 1
    r"[*_]*\s*[:：\-–=]?\s*[*_]*\s*"  # ':' possibly inside or after **bold** markup
    + _NUMBER
    + r"\s*(?P<denom{n}>/\s*\d+(?:\.\d+)?|out\s+of\s+\d+(?:\.\d+)?)?"
)
_PATTERNS = {n: re.compile(_SCORE_LINE.format(n=n), re.IGNORECASE) for n in (1, 2)}
_DENOM = re.compile(r"\d+(?:\.\d+)?")


class UnparseableReview(ValueError):
    """A review without two valid score lines; the message says what was wrong."""


def _read(text: str, n: int) -> float:
    matches = list(_PATTERNS[n].finditer(text))
    if not matches:
        raise UnparseableReview(f"no 'Score of the Assistant {n}: <score>' line")
    m = matches[-1]  # the required lines end the review; earlier mentions are discussion
    score = float(m.group(f"score{n}"))
    denom = m.group(f"denom{n}")
    if denom and float(_DENOM.search(denom).group()) != 10:
        raise UnparseableReview(f"Assistant {n}'s score is not out of 10 ({m.group(0).strip()!r})")
    if not 1 <= score <= 10:
        raise UnparseableReview(f"Assistant {n}'s score {score:g} is outside 1..10")
    return score


def parse_scores(text: str) -> tuple[float, float]:
    """(score of assistant 1, score of assistant 2), each in 1..10, or UnparseableReview."""
    if not text or not text.strip():
        raise UnparseableReview("empty review")
    return _read(text, 1), _read(text, 2)


@dataclass(frozen=True)
class Verdict:
    """The referee's view of one instruction after both orders."""

    status: str  # "ok" | "unparsed" | "failed"
    teacher_score: float | None = None
    student_score: float | None = None
    gap: float | None = None
    label: str | None = None  # "hard" | "easy" | None when not ok
    consistent: bool | None = None


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def verdict(
    order_a: tuple[float, float] | None,
    order_b: tuple[float, float] | None,
    tau: float,
    status: str = "ok",
) -> Verdict:
    """Combine order A (teacher first) and order B (student first) into one verdict.

    teacher = mean(A.1, B.2), student = mean(A.2, B.1); hard when teacher - student >= tau.
    ``consistent`` says whether both orders agree on which answer is better (or on a tie).
    """
    if status != "ok":
        return Verdict(status=status)
    if order_a is None or order_b is None:
        return Verdict(status="unparsed")
    teacher = (order_a[0] + order_b[1]) / 2
    student = (order_a[1] + order_b[0]) / 2
    gap = teacher - student
    consistent = _sign(order_a[0] - order_a[1]) == _sign(order_b[1] - order_b[0])
    return Verdict("ok", teacher, student, gap, "hard" if gap >= tau else "easy", consistent)


def split_metrics(verdicts: list[Verdict]) -> dict[str, float | int]:
    """Per-round figures: hard ratio, mean scores, order consistency, parse failures."""
    ok = [v for v in verdicts if v.status == "ok"]
    n = len(verdicts)
    hard = sum(v.label == "hard" for v in ok)

    def mean(xs: list[float]) -> float:
        return round(sum(xs) / len(xs), 4) if xs else 0.0

    return {
        "rows": n,
        "judged": len(ok),
        "hard": hard,
        "easy": len(ok) - hard,
        "unparsed": sum(v.status == "unparsed" for v in verdicts),
        "failed": sum(v.status == "failed" for v in verdicts),
        "hard_ratio": round(hard / len(ok), 4) if ok else 0.0,
        "mean_teacher_score": mean([v.teacher_score for v in ok]),
        "mean_student_score": mean([v.student_score for v in ok]),
        "order_consistency": mean([float(v.consistent) for v in ok]),
        "parse_failure_rate": round(sum(v.status == "unparsed" for v in verdicts) / n, 4)
        if n
        else 0.0,
    }
