"""Stage 2 of a Lion round, discrimination: teacher and student both answer every Cache Pool
instruction, the referee scores each pair in both orders, and the instruction is labelled
hard (``teacher - student >= tau``) or easy. Two other selections write the same table:
``split_by_loss`` (hard = highest student loss on the teacher's answer, no referee) and
``unjudged`` (no labels: the random control arm).

A review whose score lines cannot be read is asked again (with a new ``seed``, so the cache
does not hand back the same text) up to ``max_reasks`` times; rows still unreadable are
``unparsed``, left out of the split and counted. Rows whose teacher or student answer
failed are ``failed``. Nothing is ever scored -1.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from lion_ray.errors import OutputRejected
from lion_ray.logic.chat import ChatClient, ChatRequest, merge_usage, usage
from lion_ray.logic.prompts import REFEREE_RESPONSE_FORMAT, referee_messages
from lion_ray.logic.referee import (
    SplitTotals,
    UnparseableReview,
    Verdict,
    parse_scores,
    split_metrics,
    verdict,
)
from lion_ray.logic.selection import label_by_loss, learnability_scores, loss_metrics

JUDGED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("teacher_answer", pa.string()),
        ("student_answer", pa.string()),
        ("review_a", pa.string()),  # order A: the teacher's answer shown first
        ("review_b", pa.string()),  # order B: the student's answer shown first
        ("a_teacher", pa.float64()),
        ("a_student", pa.float64()),
        ("b_student", pa.float64()),
        ("b_teacher", pa.float64()),
        ("teacher_score", pa.float64()),
        ("student_score", pa.float64()),
        ("gap", pa.float64()),
        ("label", pa.string()),  # hard | easy | null when not judged
        ("status", pa.string()),  # ok | unparsed | failed
        ("consistent", pa.bool_()),
        ("referee_calls", pa.int32()),
        ("error", pa.string()),
        ("student_loss", pa.float64()),  # selections 'student_loss' and 'learnability'
        ("learnability", pa.float64()),  # selection 'learnability' only
    ]
)
ORDERS = ("a", "b")


def judge(
    table: pa.Table,
    referee: ChatClient,
    *,
    tau: float = 1.0,
    max_reasks: int = 2,
    structured: bool = False,
    label: str = "referee",
) -> tuple[pa.Table, dict]:
    """Judge (teacher_answer, student_answer) pairs in both orders; returns rows + metrics.

    ``structured`` asks the referee for a JSON schema with both scores; either way the
    review is read as JSON first, then by its score lines.

    ``table`` needs id, instruction, input, teacher_answer, student_answer; an optional
    ``upstream_error`` column marks rows whose answers failed (judged ``failed``).
    """
    rows = table.to_pylist()
    if (
        "id" not in table.column_names
    ):  # e.g. a hand-made table for `lion-ray answer --role referee`
        for i, r in enumerate(rows):
            r["id"] = str(i)
    for r in rows:
        r.setdefault("teacher_answer", r.get("answer_1", ""))
        r.setdefault("student_answer", r.get("answer_2", ""))
        r.setdefault("input", "")
    state = {
        r["id"]: {"scores": {}, "reviews": {}, "calls": 0, "error": r.get("upstream_error") or ""}
        for r in rows
    }
    pending = [(r, order) for r in rows if not state[r["id"]]["error"] for order in ORDERS]
    usages = []
    for attempt in range(max_reasks + 1):
        if not pending:
            break
        requests = []
        for r, order in pending:
            first, second = (
                (r["teacher_answer"], r["student_answer"])
                if order == "a"
                else (r["student_answer"], r["teacher_answer"])
            )
            requests.append(
                ChatRequest(
                    f"{r['id']}:{order}",
                    referee_messages(r["instruction"], r["input"], first, second),
                    attempt or None,  # a re-ask is a new request, not the cached review again
                    REFEREE_RESPONSE_FORMAT if structured else None,
                )
            )
        results = referee.ask(
            requests, label=label if attempt == 0 else f"{label} re-ask {attempt}"
        )
        usages.append(usage(results, referee.model))
        still = []
        for (r, order), res in zip(pending, results, strict=True):
            st = state[r["id"]]
            st["calls"] += 1
            st["reviews"][order] = res.text
            if res.status != "ok":
                st["error"] = f"referee call failed: {res.error}"
                continue
            try:
                st["scores"][order] = parse_scores(res.text)
            except UnparseableReview as exc:
                st["parse_error"] = str(exc)
                still.append((r, order))
        pending = still

    out, verdicts = [], []
    for r in rows:
        st = state[r["id"]]
        a, b = st["scores"].get("a"), st["scores"].get("b")
        status = "failed" if st["error"] else "ok" if a and b else "unparsed"
        v = verdict(a, b, tau, status=status)
        verdicts.append(v)
        out.append(
            {
                "id": r["id"],
                "instruction": r["instruction"],
                "input": r["input"],
                "teacher_answer": r["teacher_answer"],
                "student_answer": r["student_answer"],
                "review_a": st["reviews"].get("a", ""),
                "review_b": st["reviews"].get("b", ""),
                "a_teacher": a[0] if a else None,
                "a_student": a[1] if a else None,
                "b_student": b[0] if b else None,
                "b_teacher": b[1] if b else None,
                "teacher_score": v.teacher_score,
                "student_score": v.student_score,
                "gap": v.gap,
                "label": v.label,
                "status": v.status,
                "consistent": v.consistent,
                "referee_calls": st["calls"],
                "error": st["error"]
                or (st.get("parse_error", "") if v.status == "unparsed" else ""),
            }
        )
    metrics = split_metrics(verdicts) | {
        "referee_reasks": sum(max(0, s["calls"] - 2) for s in state.values())
    }
    return pa.Table.from_pylist(out, schema=JUDGED_SCHEMA), {
        "metrics": metrics,
        "api": merge_usage(*usages),
    }


class RefereeCannotJudge(OutputRejected):
    """Too many of the referee's reviews had no readable score."""


def check_reviews(
    judged: pa.Table | Iterable[pa.Table], model: str, max_unparsed_fraction: float
) -> None:
    """Fail discrimination when more than ``max_unparsed_fraction`` of the pairs the referee
    was asked about got no readable score: say which model, how many, two of its replies,
    and what to change. ``judged``: the judged table, or its windows."""
    asked = unparsed = 0
    samples: list[str] = []
    for window in [judged] if isinstance(judged, pa.Table) else judged:
        for r in window.select(["status", "review_a", "review_b"]).to_pylist():
            if r["status"] == "failed":
                continue
            asked += 1
            if r["status"] == "unparsed":
                unparsed += 1
                if len(samples) < 2:
                    samples.append(r["review_a"] or r["review_b"])
    if not asked or unparsed <= max_unparsed_fraction * asked:
        return
    shown = " | ".join(repr(_clip(text)) for text in samples)
    raise RefereeCannotJudge(
        f"the referee ({model}) gave no readable score for {unparsed} of {asked} "
        f"pairs ({unparsed / asked:.0%}), more than "
        f"loop.referee_max_unparsed_fraction ({max_unparsed_fraction:.0%}) allows, so the "
        f"round cannot tell hard from easy. Two of its replies: {shown}. Use a referee "
        "model that follows the review format (it must end with 'Score of the Assistant "
        "1: <score>' and 'Score of the Assistant 2: <score>'), raise referee.max_tokens if "
        "its replies are cut off, or set referee.structured_output: true (JSON scores); "
        "the answers are cached, so a rerun pays only for the new reviews"
    )


def judged_metrics(windows: Iterable[pa.Table]) -> dict:
    """The split's figures (``split_metrics``'s) over a judged table read a window at a
    time: a stage's output, whatever windows (and attempts) wrote it."""
    totals = SplitTotals()
    reasks = 0
    for window in windows:
        for r in window.select(
            ["status", "label", "teacher_score", "student_score", "consistent", "referee_calls"]
        ).to_pylist():
            totals.add(
                Verdict(
                    status=r["status"],
                    label=r["label"],
                    teacher_score=r["teacher_score"],
                    student_score=r["student_score"],
                    consistent=r["consistent"],
                )
            )
            reasks += max(0, (r["referee_calls"] or 0) - 2)
    return totals.metrics() | {"referee_reasks": reasks}


def _clip(text: str, width: int = 160) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 3] + "..."


def pair_answers(pool: pa.Table, teacher: pa.Table, student: pa.Table | None) -> pa.Table:
    """Pool rows with both answers (the teacher's only, when ``student`` is None), and why a
    row cannot be judged when an answer failed."""
    t = {r["id"]: r for r in teacher.to_pylist()}
    s = {r["id"]: r for r in student.to_pylist()} if student is not None else None
    rows = []
    for r in pool.to_pylist():
        ta, sa = t.get(r["id"]), s.get(r["id"]) if s is not None else None
        problems = []
        if ta is None or ta["status"] != "ok":
            problems.append(
                f"teacher answer {'missing' if ta is None else 'failed: ' + ta['error']}"
            )
        if s is not None and (sa is None or sa["status"] != "ok"):
            problems.append(
                f"student answer {'missing' if sa is None else 'failed: ' + sa['error']}"
            )
        rows.append(
            {
                "id": r["id"],
                "instruction": r["instruction"],
                "input": r["input"],
                "teacher_answer": ta["answer"] if ta else "",
                "student_answer": sa["answer"] if sa else "",
                "upstream_error": "; ".join(problems),
            }
        )
    return pa.Table.from_pylist(rows)


def _row(r: dict, **fields) -> dict:
    """A judged row with every column; ``fields`` fill what the selection knows."""
    base = dict.fromkeys(JUDGED_SCHEMA.names)
    base.update(
        id=r["id"],
        instruction=r["instruction"],
        input=r["input"],
        teacher_answer=r.get("teacher_answer", ""),
        student_answer="",
        review_a="",
        review_b="",
        referee_calls=0,
        error="",
    )
    return base | fields


def split_by_loss(
    pairs: pa.Table,
    losses: dict[str, float | None],
    hard_fraction: float,
    previous: dict[str, float | None] | None = None,
) -> tuple[pa.Table, dict]:
    """Label pool rows by the student's loss on the teacher's answer (``pairs`` from
    ``pair_answers``, with an empty student side), or with ``previous`` (each id's loss one
    round earlier) by its learnability; rows whose teacher answer or loss failed are
    ``failed``."""
    split = LossSplit(scored_losses([pairs], losses), hard_fraction, previous)
    return split.rows(pairs), {"metrics": split.metrics, "api": {}}


def scored_losses(
    pairs: Iterable[pa.Table], losses: dict[str, float | None]
) -> dict[str, float | None]:
    """Every pair's loss by id, None where its teacher answer (or its scoring) failed."""
    return {
        r["id"]: None if r["upstream_error"] else losses.get(r["id"])
        for window in pairs
        for r in window.select(["id", "upstream_error"]).to_pylist()
    }


class LossSplit:
    """The labels of a loss split, decided once over every row's loss (ids and numbers
    only), then written out a window of pairs at a time (``rows``)."""

    def __init__(
        self,
        scored: dict[str, float | None],
        hard_fraction: float,
        previous: dict[str, float | None] | None = None,
    ):
        """``scored``: every row's loss by id (``scored_losses``)."""
        self.previous = previous
        self.scored = scored
        self.ranked = scored if previous is None else learnability_scores(scored, previous)
        self.labels = label_by_loss(self.ranked, hard_fraction)
        metrics = loss_metrics(scored, self.labels)
        if previous is not None:
            with_history = [k for k, v in scored.items() if v is not None and previous.get(k)]
            metrics["with_previous_loss"] = len(with_history)
            metrics["mean_learnability_hard"] = _mean(
                [self.ranked[k] for k, v in self.labels.items() if v == "hard"]
            )
        self.metrics = metrics

    def rows(self, pairs: pa.Table) -> pa.Table:
        out = []
        for r in pairs.to_pylist():
            label = self.labels.get(r["id"])
            out.append(
                _row(
                    r,
                    student_loss=self.scored.get(r["id"]),
                    learnability=None if self.previous is None else self.ranked.get(r["id"]),
                    label=label,
                    status="ok" if label else "failed",
                    error=r["upstream_error"] or ("" if label else "no student loss"),
                )
            )
        return pa.Table.from_pylist(out, schema=JUDGED_SCHEMA)


def _mean(xs: list[float]) -> float:
    return round(sum(xs) / len(xs), 4) if xs else 0.0


def unjudged(pool: pa.Table) -> tuple[pa.Table, dict]:
    """Every pool row as a parent with no label (selection 'random': nothing is asked)."""
    out = [_row(r, status="ok") for r in pool.to_pylist()]
    return pa.Table.from_pylist(out, schema=JUDGED_SCHEMA), {
        "metrics": {
            "rows": len(out),
            "judged": 0,
            "hard": 0,
            "easy": 0,
            "unparsed": 0,
            "failed": 0,
        },
        "api": {},
    }
