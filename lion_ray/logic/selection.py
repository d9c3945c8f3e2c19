"""Selection by the student's own loss: which Cache Pool instructions count as hard.

The referee compares two answers; the student's mean per-token loss on the teacher's answer
asks the student directly how unlikely it finds what the teacher said. It needs no API call,
so discrimination costs only the student's forward passes.
"""

from __future__ import annotations

import math


def label_by_loss(losses: dict[str, float | None], hard_fraction: float) -> dict[str, str | None]:
    """The ``hard_fraction`` of scored rows with the highest loss are hard, the rest easy;
    rows without a loss (failed) get no label. Ties break by id, so reruns agree."""
    if not 0 < hard_fraction < 1:
        raise ValueError("hard_fraction must be between 0 and 1 (exclusive)")
    scored = sorted(
        ((loss, key) for key, loss in losses.items() if loss is not None and math.isfinite(loss)),
        key=lambda x: (-x[0], x[1]),
    )
    n_hard = round(len(scored) * hard_fraction)
    hard = {key for _, key in scored[:n_hard]}
    easy = {key for _, key in scored[n_hard:]}
    return {key: "hard" if key in hard else "easy" if key in easy else None for key in losses}


def loss_metrics(losses: dict[str, float | None], labels: dict[str, str | None]) -> dict:
    """The per-round split figures, in the same keys the referee's split reports."""
    ok = [k for k, v in labels.items() if v is not None]
    hard = sum(labels[k] == "hard" for k in ok)

    def mean(keys: list[str]) -> float:
        return round(sum(losses[k] for k in keys) / len(keys), 4) if keys else 0.0

    return {
        "rows": len(losses),
        "judged": len(ok),
        "hard": hard,
        "easy": len(ok) - hard,
        "unparsed": 0,
        "failed": len(losses) - len(ok),
        "hard_ratio": round(hard / len(ok), 4) if ok else 0.0,
        "mean_loss": mean(ok),
        "mean_hard_loss": mean([k for k in ok if labels[k] == "hard"]),
        "mean_easy_loss": mean([k for k in ok if labels[k] == "easy"]),
    }
