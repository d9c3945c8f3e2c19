"""Filters for generated instructions, applied before the ROUGE-L dedup.

A candidate is dropped when it is empty, cut off by the generator's length limit, too
short, or starts with punctuation (DESIGN section 1). Each rejection has a reason, so a
round reports how many candidates were lost to each.
"""

from __future__ import annotations

import string

REASONS = ("empty", "cut_off", "too_short", "punctuation", "similar")


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
