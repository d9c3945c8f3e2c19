"""The pool half of ROUGE-L dedup, spread over Ray workers when the pool is large.

Whether a candidate is too similar to the Cache Pool does not depend on the other
candidates, so candidates are checked in parallel chunks against one shared index (put in
the object store once). The order-dependent half (against candidates accepted earlier)
then runs on the driver, in order, in :class:`lion_ray.logic.dedup.Deduper`.
"""

from __future__ import annotations

from collections.abc import Sequence

import ray

from lion_ray.logic.dedup import Deduper, RougeIndex

PARALLEL_MIN_PAIRS = 20_000_000  # below this, one process is faster than shipping the index


@ray.remote(num_cpus=1)
def _check_chunk(index: RougeIndex, candidates: list[str]) -> list[bool]:
    return [index.exceeds(c) for c in candidates]


def pool_flags(index: RougeIndex, candidates: Sequence[str], workers: int = 0) -> list[bool]:
    """For each candidate: is its ROUGE-L F against some indexed pool text above the threshold?"""
    if (
        workers <= 1
        or len(index) * len(candidates) < PARALLEL_MIN_PAIRS
        or not ray.is_initialized()
    ):
        return [index.exceeds(c) for c in candidates]
    ref = ray.put(index)
    size = -(-len(candidates) // workers)
    chunks = [list(candidates[i : i + size]) for i in range(0, len(candidates), size)]
    return [
        flag for part in ray.get([_check_chunk.remote(ref, c) for c in chunks]) for flag in part
    ]


def offer_all(deduper: Deduper, candidates: Sequence[str], workers: int = 0) -> list[bool]:
    """Decisions for ``candidates`` in order, the pool half in parallel when worth it."""
    flags = pool_flags(deduper.pool_index, candidates, workers)
    return [deduper.offer(c, f) for c, f in zip(candidates, flags, strict=True)]
