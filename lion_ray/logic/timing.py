"""Where a stage's wall time went: intervals of engine compute or API waiting, merged."""

from __future__ import annotations


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals: time something was busy, however
    many workers were busy at once."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total
