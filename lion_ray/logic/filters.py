"""Filters for generated instructions, applied before the ROUGE-L dedup.

A candidate is dropped when it is empty, cut off by the generator's length limit, too
short, or starts with punctuation (DESIGN section 1). Each rejection has a reason, so a
round reports how many candidates were lost to each, and ``rejection_summary`` shows the
user whether the filter, rather than the selection, shapes what is added.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Callable

# in the order a candidate meets them
REASONS = (
    "api_failed",
    "empty",
    "cut_off",
    "too_short",
    "punctuation",
    "similar_to_pool",  # ROUGE-L above the threshold against a Cache Pool instruction
    "similar_to_accepted",  # ... against a candidate accepted before it in the round
)


def rejection_reason(text: str, finish_reason: str, min_words: int = 4) -> str | None:
    """Why ``text`` is not a usable instruction, or None when it passes the filters."""
    stripped = text.strip()
    if not stripped:
        return "empty"
    if finish_reason == "length":
        return "cut_off"
    if len(stripped.split()) < min_words:
        return "too_short"
    if stripped[0] in string.punctuation:
        return "punctuation"
    return None


def _counts(rows: list[dict]) -> dict:
    rejected = Counter(r["reason"] for r in rows if not r["accepted"])
    return {
        "candidates": len(rows),
        "accepted": sum(bool(r["accepted"]) for r in rows),
        "rejected": {k: rejected[k] for k in (*REASONS, *sorted(rejected)) if rejected.get(k)},
        "rejected_share": round(sum(rejected.values()) / len(rows), 3) if rows else 0.0,
    }


def rejection_summary(
    candidates: list[dict],
    family_of: Callable[[str], str | None] | None = None,
    examples: int = 3,
) -> dict:
    """A round's candidates, accepted and rejected by reason, with the first ``examples``
    rejections of each reason (a similar one beside its nearest neighbour and its score);
    with ``family_of`` (sandbox runs: an instruction's task family) the same per family.
    ``candidates`` are the generation stage's rows; a ``surplus`` one (answered after the
    target was met) was never offered and is not counted."""
    rows = [r for r in candidates if r["reason"] != "surplus"]
    out = _counts(rows)
    shown: dict[str, list[dict]] = {}
    for r in rows:
        if r["accepted"] or len(shown.setdefault(r["reason"], [])) >= examples:
            continue
        example = {"instruction": r["instruction"]}
        if r.get("nearest") is not None:
            example |= {"nearest": r["nearest"], "similarity": round(r["similarity"], 3)}
        shown[r["reason"]].append(example)
    out["examples"] = {k: v for k, v in shown.items() if v}
    if family_of is not None:
        families: dict[str, list[dict]] = {}
        for r in rows:
            families.setdefault(family_of(r["instruction"]) or "other", []).append(r)
        out["by_family"] = {f: _counts(families[f]) for f in sorted(families)}
    return out
