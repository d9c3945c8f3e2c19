"""Judge-based evaluation arithmetic, as the paper reports it.

Each question's candidate and reference answers are scored by a judge in both orders; a
side's score is the mean of its two scores. The relative score is
``sum(candidate scores) / sum(reference scores) x 100`` overall and per category (the paper:
Lion-7B 93.8% of ChatGPT on the 80 Vicuna questions). Questions the judge could not score
in both orders are left out and counted, never scored.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from lion_ray.errors import LionError


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    input: str = ""
    category: str = "general"


def read_questions(records: list[tuple[object, str]]) -> list[Question]:
    """Questions from Vicuna records (question_id, text, category) or pool records
    (instruction, input, and a category or sandbox family when present)."""
    out = []
    for rec, where in records:
        if not isinstance(rec, dict):
            raise LionError(f"{where}: expected a JSON object")
        if "text" in rec:  # Vicuna question format
            qid, text, inp = rec.get("question_id"), rec["text"], ""
        elif "instruction" in rec:
            qid, text, inp = (
                rec.get("question_id", rec.get("id")),
                rec["instruction"],
                rec.get("input") or "",
            )
        else:
            raise LionError(
                f"{where}: a question needs 'text' (Vicuna format) or 'instruction' (pool format)"
            )
        if not isinstance(text, str) or not text.strip():
            raise LionError(f"{where}: empty question text")
        category = rec.get("category") or rec.get("family") or "general"
        out.append(
            Question(str(qid if qid is not None else len(out) + 1), text, inp, str(category))
        )
    ids = [q.id for q in out]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise LionError(f"question ids must be unique; repeated: {', '.join(dupes[:5])}")
    return out


@dataclass(frozen=True)
class Scored:
    category: str
    candidate: float | None  # mean over both orders; None when the judge's scores were unusable
    reference: float | None


def relative_scores(rows: list[Scored]) -> dict:
    """Relative score overall and per category, win/tie/loss counts, unscored count."""

    def summarize(items: list[Scored]) -> dict:
        scored = [r for r in items if r.candidate is not None and r.reference is not None]
        cand = sum(r.candidate for r in scored)
        ref = sum(r.reference for r in scored)
        return {
            "questions": len(items),
            "scored": len(scored),
            "unscored": len(items) - len(scored),
            "candidate_total": round(cand, 4),
            "reference_total": round(ref, 4),
            "relative_score": round(100.0 * cand / ref, 2) if ref else None,
            "wins": sum(r.candidate > r.reference for r in scored),
            "ties": sum(r.candidate == r.reference for r in scored),
            "losses": sum(r.candidate < r.reference for r in scored),
        }

    by_cat: dict[str, list[Scored]] = defaultdict(list)
    for r in rows:
        by_cat[r.category].append(r)
    return {
        "overall": summarize(rows),
        "by_category": {c: summarize(v) for c, v in sorted(by_cat.items())},
    }


def markdown_table(result: dict, title: str = "") -> str:
    """The per-category table, overall last, as markdown."""
    head = (
        "| category | questions | relative score | wins | ties | losses | candidate | reference |"
    )
    lines = ([f"### {title}", ""] if title else []) + [
        head,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(name: str, s: dict) -> str:
        rel = "n/a" if s["relative_score"] is None else f"{s['relative_score']:.1f}%"
        return (
            f"| {name} | {s['scored']}/{s['questions']} | {rel} | {s['wins']} | {s['ties']} | {s['losses']} | "
            f"{s['candidate_total']:g} | {s['reference_total']:g} |"
        )

    lines += [row(c, s) for c, s in result["by_category"].items()]
    lines.append(row("**overall**", result["overall"]))
    return "\n".join(lines) + "\n"
