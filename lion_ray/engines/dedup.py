"""The Cache Pool's half of ROUGE-L dedup, kept for the whole run.

Whether a candidate is too similar to the Cache Pool does not depend on the other
candidates, so it is checked against one index of the pool. ``PoolIndex`` holds it: the
pool's instructions (tokenized, in an inverted index) and their ids (the very text again),
built once and extended with each round's new instructions, since the next round's Cache
Pool is this one plus them. ``PoolIndexActor`` keeps it in a Ray actor for the run, so the
driver's memory does not grow with the pool. The order-dependent half (against candidates
accepted earlier in the round) runs on the driver, in order, in ``generation``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lion_ray.logic.dedup import RougeIndex, common_words, rouge_tokens


class IndexLost(RuntimeError):
    """The index holds no pool (its actor restarted, or the call was lost with it): load
    the pool again before asking it anything."""


class PoolIndex:
    """The Cache Pool's instructions for dedup: ROUGE-L queries, exact-id lookups."""

    def __init__(self, threshold: float = 0.7, similarity: str = "rouge_l"):
        self.threshold, self.similarity = threshold, similarity
        self.index = RougeIndex(threshold=threshold)
        self.texts: list[str] = []
        self.ids: set[str] = set()
        self.covers: str | None = None  # the fingerprint of the pool it indexes

    def rebuild(self, windows: Iterable[Sequence[tuple[str, str]]], covers: str) -> int:
        """Index a whole pool, given as windows of (id, instruction); returns its size."""
        pairs = [pair for window in windows for pair in window]
        common = None
        if self.similarity == "same_payload":  # template words, from the pool as it is
            common = common_words(rouge_tokens(t) for _, t in pairs)
        self.index = RougeIndex(threshold=self.threshold, common=common)
        self.texts, self.ids = [], set()
        self._add(pairs)
        self.covers = covers
        return len(self.texts)

    def load(self, pool_uri: str, window_rows: int, covers: str) -> int:
        """Index the pool file at ``pool_uri``, read a window at a time."""
        return self.rebuild(_pairs(pool_uri, window_rows), covers)

    def add_file(self, uri: str, window_rows: int, covers: str, after: str) -> int:
        """Index the instructions of a pool file (a round's new ones) besides the pool it
        indexes, which must be ``after`` (a restarted, empty index is not: ``IndexLost``)."""
        if self.covers != after:
            raise IndexLost(f"the Cache Pool index holds {self.covers}, not {after}")
        for window in _pairs(uri, window_rows):
            self._add(window)
        self.covers = covers
        return len(self.texts)

    def extend(self, pairs: Sequence[tuple[str, str]], covers: str) -> int:
        """Index a round's new instructions (the next Cache Pool is the old one plus them).
        With ``same_payload`` the template words depend on the whole pool, so it is rebuilt
        instead (the caller passes the whole pool then)."""
        self._add(pairs)
        self.covers = covers
        return len(self.texts)

    def _add(self, pairs: Sequence[tuple[str, str]]) -> None:
        fresh = [(i, t) for i, t in pairs if i not in self.ids]
        self.index.extend(t for _, t in fresh)
        self.texts += [t for _, t in fresh]
        self.ids.update(i for i, _ in fresh)

    def check(self, texts: Sequence[str], ids: Sequence[str]) -> list[tuple[bool, bool]]:
        """For each candidate: (ROUGE-L above the threshold against some pool text, its id
        already in the pool)."""
        self._held()
        return [(self.index.exceeds(t), i in self.ids) for t, i in zip(texts, ids, strict=True)]

    def nearest(self, texts: Sequence[str]) -> list[tuple[float, str | None]]:
        """(F, pool text) of the pool text most like each candidate, above the threshold."""
        self._held()
        out = []
        for text in texts:
            score, doc = self.index.max_match(text)
            out.append((score, self.texts[doc] if doc >= 0 else None))
        return out

    def covered(self) -> str | None:
        return self.covers

    def _held(self) -> None:
        # An empty index would pass every candidate: a restarted actor must not answer.
        if self.covers is None:
            raise IndexLost("the Cache Pool index holds no pool; load it first")

    def template_words(self) -> frozenset[str] | None:
        self._held()
        return self.index.common

    def __len__(self) -> int:
        return len(self.texts)


def _pairs(uri: str, window_rows: int):
    from lion_ray import storage

    for window in storage.iter_windows(uri, window_rows, ["id", "instruction"]):
        columns = window.to_pydict()
        yield list(zip(columns["id"], columns["instruction"], strict=True))


class PoolIndexActor:
    """``PoolIndex`` in a Ray actor (the same methods, as remote calls)."""

    def __init__(self, threshold: float, similarity: str, local_files: bool = False):
        """``local_files``: the pools are on the driver's disk, so the actor runs on the
        driver's node, holding no CPU (as the driver holds none: it works while the driver
        waits on it, and a head may have no CPUs to give). A restarted actor indexes
        nothing, which the driver sees (``covered``) and so loads the pool again."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options: dict = {"num_cpus": 0.5, "max_restarts": 3}
        if local_files:
            here = ray.get_runtime_context().get_node_id()
            options |= {
                "num_cpus": 0,
                "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False),
            }
        self.handle = ray.remote(PoolIndex).options(**options).remote(threshold, similarity)

    def __getattr__(self, name: str):
        import ray

        method = getattr(self.handle, name)

        def call(*args):
            try:
                return ray.get(method.remote(*args))
            except ray.exceptions.RayActorError as error:  # restarted: its state is gone
                raise IndexLost(f"the Cache Pool index actor was lost ({error})") from error

        return call

    def close(self) -> None:
        import ray

        ray.kill(self.handle)


PARALLEL_MIN_PAIRS = 20_000_000  # below this, one process is faster than shipping the index


def _check_chunk(index: RougeIndex, candidates: list[str]) -> list[bool]:
    return [index.exceeds(c) for c in candidates]


def pool_flags(index: RougeIndex, candidates: Sequence[str], workers: int = 0) -> list[bool]:
    """For each candidate: is its ROUGE-L F against some indexed pool text above the
    threshold? In parallel Ray tasks when the pool and the candidates are large
    (``lion-ray dedup --workers``)."""
    import ray

    if (
        workers <= 1
        or len(index) * len(candidates) < PARALLEL_MIN_PAIRS
        or not ray.is_initialized()
    ):
        return [index.exceeds(c) for c in candidates]
    ref = ray.put(index)
    size = -(-len(candidates) // workers)
    chunks = [list(candidates[i : i + size]) for i in range(0, len(candidates), size)]
    check = ray.remote(num_cpus=1)(_check_chunk)
    return [flag for part in ray.get([check.remote(ref, c) for c in chunks]) for flag in part]


def offer_all(deduper, candidates: Sequence[str], workers: int = 0) -> list[bool]:
    """Decisions for ``candidates`` in order, the pool half in parallel when worth it."""
    flags = pool_flags(deduper.pool_index, candidates, workers)
    return [deduper.offer(c, f) for c, f in zip(candidates, flags, strict=True)]
