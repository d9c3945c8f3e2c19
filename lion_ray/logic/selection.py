"""Selection by the student's own loss: which Cache Pool instructions count as hard.

The referee compares two answers; the student's mean per-token loss on the teacher's answer
asks the student directly how unlikely it finds what the teacher said. It needs no API call,
so discrimination costs only the student's forward passes.

``learnability`` asks instead which instructions the student can still learn. With L the
loss now and L_prev the same instruction's loss one round earlier (the Cache Pool keeps its
instructions, so most have one), the loss fell by the fraction f = (L_prev - L) / L_prev
in a round of training. If it keeps falling at that rate, another round removes about

    learnability = L * clip(f, 0, 1)

of it. That is zero for what the student never moves on (the unlearnable or noisy items
that RHO-LOSS, arXiv 2206.07137, subtracts a reference model's loss to avoid) and small
for what it already knows (low L), and largest in between, where learning-progress
selection (arXiv 2502.12272) puts its budget. An instruction without a previous loss (new
in the pool) gets the pool's median f; in the first round no instruction has one, every f
is the same, and the order is the student_loss order.
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


def learnability_scores(
    losses: dict[str, float | None], previous: dict[str, float | None]
) -> dict[str, float | None]:
    """Each row's ``L * clip((L_prev - L) / L_prev, 0, 1)`` (see the module's docstring);
    rows without a current loss get None, rows without a usable previous loss the median
    progress of the rows that have one (1 when none has: the plain loss order)."""

    def usable(x: float | None) -> bool:
        return x is not None and math.isfinite(x)

    progress: dict[str, float] = {}
    for key, loss in losses.items():
        before = previous.get(key)
        if usable(loss) and usable(before) and before > 0:
            progress[key] = min(1.0, max(0.0, (before - loss) / before))
    ranked = sorted(progress.values())
    if not ranked:
        typical = 1.0
    elif len(ranked) % 2:
        typical = ranked[len(ranked) // 2]
    else:
        typical = (ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2
    return {
        key: loss * progress.get(key, typical) if usable(loss) else None
        for key, loss in losses.items()
    }
