"""Reading the referee's reviews and turning both-order scores into the hard/easy split.

The referee sees every (teacher, student) pair twice: order A puts the teacher's answer
first, order B the student's. Each review must end with two score lines; a review whose
scores cannot be read is never guessed (the original code scored it -1 and averaged it
in): the caller re-asks, and rows still unreadable are labelled ``unparsed`` and left out
of the split.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# One score line, alone on its line (markdown bullets, quotes, headings and bold around it
# are fine): "Score of the Assistant 1: 8", "**Score of the Assistant 1:** 8/10",
# "Score for the Assistant 1 - 8.5", "score of assistant 1: 8 out of 10". Anything else on
# the line ("7-8", "7,5", "8 would be unfair") makes it a line of discussion, not a score.
_SCORE_LINE = re.compile(
    r"^[ \t>#*_-]*"
    r"score\s+(?:of|for)\s+(?:the\s+)?assistant\s*(?P<n>[12])"
    r"[ \t]*[*_]*[ \t]*[:：=\-–]?[ \t]*[*_]*[ \t]*"
    r"(?P<score>\d+(?:\.\d+)?)"
    r"[ \t]*(?:/[ \t]*(?P<slash>\d+(?:\.\d+)?)|out[ \t]+of[ \t]+(?P<outof>\d+(?:\.\d+)?))?"
    r"[ \t*_.]*$",
    re.IGNORECASE | re.MULTILINE,
)
_JSON_KEYS = ("score_assistant_1", "score_assistant_2")


class UnparseableReview(ValueError):
    """A review without two valid score lines; the message says what was wrong."""


def _checked(score: float, n: int, denominator: str | None = None) -> float:
    if denominator is not None and float(denominator) != 10:
        raise UnparseableReview(f"Assistant {n}'s score is not out of 10 (/{denominator})")
    if not 1 <= score <= 10:
        raise UnparseableReview(f"Assistant {n}'s score {score:g} is outside 1..10")
    return score


def _from_json(text: str) -> tuple[float, float] | None:
    """Scores from a structured (JSON schema) review; None when the text is not JSON."""
    body = text.strip()
    if body.startswith("```"):  # a fenced block: ```json ... ```
        body = body.strip("`").removeprefix("json").strip()
    if not body.startswith("{"):
        return None
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        raise UnparseableReview("a JSON review that does not parse (cut off?)") from None
    scores = []
    for n, key in enumerate(_JSON_KEYS, 1):
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UnparseableReview(f"JSON review without a number in {key!r}")
        scores.append(_checked(float(value), n))
    return scores[0], scores[1]


def parse_scores(text: str) -> tuple[float, float]:
    """(score of assistant 1, score of assistant 2), each in 1..10, or UnparseableReview.

    A JSON review (structured output) is read by its keys; a text review by its score lines,
    each alone on its line, whatever its line endings (``\\r\\n`` included).
    A score repeated with the same number is fine (a summary after the discussion); an
    assistant given two different scores is refused, not read as the last one: a judge that
    changed its mind is re-asked rather than guessed."""
    if not text or not text.strip():
        raise UnparseableReview("empty review")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    structured = _from_json(text)
    if structured is not None:
        return structured
    found: dict[int, list[float]] = {1: [], 2: []}
    for m in _SCORE_LINE.finditer(text):
        n = int(m.group("n"))
        found[n].append(_checked(float(m.group("score")), n, m.group("slash") or m.group("outof")))
    for n in (1, 2):
        if not found[n]:
            raise UnparseableReview(
                f"no 'Score of the Assistant {n}: <score>' line (a score alone on its line)"
            )
        if len(set(found[n])) > 1:
            scores = " then ".join(f"{s:g}" for s in found[n])
            raise UnparseableReview(f"Assistant {n} is given different scores ({scores})")
    return found[1][0], found[2][0]


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


@dataclass
class SplitTotals:
    """Running totals of a split, so that a stage read a window at a time gets the same
    figures as one read whole (``split_metrics``)."""

    rows: int = 0
    judged: int = 0
    hard: int = 0
    unparsed: int = 0
    failed: int = 0
    teacher_sum: float = 0.0
    student_sum: float = 0.0
    consistent: float = 0.0

    def add(self, v: Verdict) -> None:
        self.rows += 1
        if v.status == "ok":
            self.judged += 1
            self.hard += v.label == "hard"
            self.teacher_sum += v.teacher_score
            self.student_sum += v.student_score
            self.consistent += float(v.consistent)
        elif v.status == "unparsed":
            self.unparsed += 1
        elif v.status == "failed":
            self.failed += 1

    def metrics(self) -> dict[str, float | int]:
        """Per-round figures: hard ratio, mean scores, order consistency, parse failures."""

        def mean(total: float) -> float:
            return round(total / self.judged, 4) if self.judged else 0.0

        return {
            "rows": self.rows,
            "judged": self.judged,
            "hard": self.hard,
            "easy": self.judged - self.hard,
            "unparsed": self.unparsed,
            "failed": self.failed,
            "hard_ratio": round(self.hard / self.judged, 4) if self.judged else 0.0,
            "mean_teacher_score": mean(self.teacher_sum),
            "mean_student_score": mean(self.student_sum),
            "order_consistency": mean(self.consistent),
            "parse_failure_rate": round(self.unparsed / self.rows, 4) if self.rows else 0.0,
        }


def split_metrics(verdicts: list[Verdict]) -> dict[str, float | int]:
    """Per-round figures: hard ratio, mean scores, order consistency, parse failures."""
    totals = SplitTotals()
    for v in verdicts:
        totals.add(v)
    return totals.metrics()
