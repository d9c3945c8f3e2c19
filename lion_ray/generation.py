"""Stage 3 of a Lion round, generation: new instructions from the hard ones (same domain,
task type, length and difficulty) and from the easy ones (same domain, rarer).

Parents are drawn in a seeded order and cycled; every call carries a ``seed`` made of the
round and the attempt, so it is a distinct request (the cache would otherwise return an
instruction an earlier attempt or round already produced). Calls go out in waves until
the target is met or the attempt budget (``factor x target``) is spent. Each candidate passes the filters (empty, cut off, too short, leading punctuation)
and then the ROUGE-L dedup against the Cache Pool and every candidate accepted before it,
in attempt order, so the result does not depend on which response arrived first.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable

import pyarrow as pa

from lion_ray.config import LoopConfig
from lion_ray.errors import LionError
from lion_ray.logic.chat import ChatClient, ChatRequest, merge_usage, usage
from lion_ray.logic.dedup import RougeIndex
from lion_ray.logic.filters import rejection_reason, rejection_summary
from lion_ray.logic.pools import POOL_SCHEMA, build_pool, instruction_id, make_row
from lion_ray.logic.prompts import clean_generated_instruction, generator_messages

CANDIDATE_SCHEMA = pa.schema(
    [
        ("attempt", pa.int32()),
        ("kind", pa.string()),
        ("parent_id", pa.string()),
        ("parent_instruction", pa.string()),
        ("seed", pa.int64()),
        ("instruction", pa.string()),
        ("finish_reason", pa.string()),
        ("accepted", pa.bool_()),
        # why not accepted: one of filters.REASONS, or surplus; "" if accepted
        ("reason", pa.string()),
        # a similar_* rejection: the text it is too like, and their ROUGE-L F
        ("nearest", pa.string()),
        ("similarity", pa.float64()),
    ]
)


ROUND_SEED_STRIDE = 10**9  # attempts per kind per round stay far below this


def generation_seed(round_no: int, attempt: int) -> int:
    """The ``seed`` of a generator call: distinct for every round and attempt, so a parent
    drawn again (later in the round, or in a later round) gets a new instruction instead of
    the cached one, which is already in the Cache Pool."""
    return round_no * ROUND_SEED_STRIDE + attempt


def ask_generator(
    parents: pa.Table,
    kind: str,
    generator: ChatClient,
    *,
    seeds: list[int | None] | None = None,
    label: str | None = None,
) -> tuple[pa.Table, dict]:
    """One generator call per parent row; returns (parent id, new text, finish reason,
    status) rows and the generator's API usage."""
    rows = parents.to_pylist()
    seeds = seeds if seeds is not None else [None] * len(rows)
    results = generator.ask(
        [
            ChatRequest(f"{i}", generator_messages(kind, r["instruction"], r.get("input", "")), s)
            for i, (r, s) in enumerate(zip(rows, seeds, strict=True))
        ],
        label=label or f"generator ({kind})",
    )
    out = [
        {
            "parent_id": r["id"],
            "instruction": clean_generated_instruction(res.text),
            "finish_reason": res.finish_reason,
            "status": res.status,
            "error": res.error,
        }
        for r, res in zip(rows, results, strict=True)
    ]
    return pa.Table.from_pylist(out), usage(results, generator.model)


def generate(
    judged,
    pool,
    loop: LoopConfig,
    generator: ChatClient,
    *,
    round_no: int,
    family_of: Callable[[str], str | None] | None = None,
) -> tuple[pa.Table, pa.Table, dict]:
    """(new instructions as a pool, every candidate with its fate, stats).

    ``judged``: the judged Cache Pool, a table or a function that yields it a window at a
    time (only ids and labels are kept, and the texts of the parents drawn). ``pool``: the
    Cache Pool's dedup half, a ``PoolIndex`` (or its actor), or the Cache Pool itself as a
    table (indexed here). ``family_of`` (sandbox runs) adds the candidates' fates per task
    family to the stats."""
    windows = judged if callable(judged) else lambda: [judged]
    if isinstance(pool, pa.Table):
        from lion_ray.engines.dedup import PoolIndex

        table, pool = pool, PoolIndex(loop.rouge_threshold, loop.similarity)
        columns = table.select(["id", "instruction"]).to_pydict()
        pool.rebuild([list(zip(columns["id"], columns["instruction"], strict=True))], "table")
    accepted = AcceptedCandidates(loop.rouge_threshold, pool_common(pool, loop))
    accepted_ids: set[str] = set()
    new_rows, candidates, usages = [], [], []
    stats: dict = {}
    dedup_s = 0.0  # the ROUGE-L checks: the stage's own compute, beside the API waits
    for kind, target in (("hard", loop.hard_per_round), ("easy", loop.easy_per_round)):
        mined = loop.selection != "random"
        order = ParentOrder(windows, kind if mined else None, f"{loop.seed}:{round_no}:{kind}")
        budget = math.ceil(target * loop.generation_attempts_factor) if len(order) else 0
        parents = order.rows(budget)
        reasons: Counter = Counter()
        accepted_n = attempt = 0
        while accepted_n < target and attempt < budget:
            wave = min(budget - attempt, max(8, math.ceil((target - accepted_n) * 1.25)))
            plan = [(attempt + i, parents[attempt + i]) for i in range(wave)]
            seeds = [generation_seed(round_no, a) for a, _ in plan]
            parent_table = pa.Table.from_pylist(
                [
                    {"id": p["id"], "instruction": p["instruction"], "input": p["input"]}
                    for _, p in plan
                ]
            )
            answers, used = ask_generator(
                parent_table,
                kind,
                generator,
                seeds=seeds,
                label=f"generator ({kind}) {accepted_n}/{target}",
            )
            usages.append(used)
            results = answers.to_pylist()
            passing = [
                "api_failed"
                if res["status"] != "ok"
                else rejection_reason(res["instruction"], res["finish_reason"], loop.min_words)
                for res in results
            ]
            texts = [
                res["instruction"] for res, why in zip(results, passing, strict=True) if why is None
            ]
            checking = time.monotonic()
            checks = iter(pool.check(texts, [instruction_id(t) for t in texts]) if texts else [])
            for (a, parent), seed, res, why in zip(plan, seeds, results, passing, strict=True):
                reason, nearest, similarity = why, None, None
                if reason is None:
                    similar, in_pool = next(checks)
                    same_id = instruction_id(res["instruction"])
                    if accepted_n >= target:
                        reason = "surplus"
                    elif in_pool or same_id in accepted_ids:  # the very text again
                        reason = "similar_to_pool" if in_pool else "similar_to_accepted"
                        nearest, similarity = res["instruction"], 1.0
                    elif similar:
                        reason = "similar_to_pool"
                        similarity, nearest = pool.nearest([res["instruction"]])[0]
                    else:
                        reason = accepted.reason(res["instruction"])
                        if reason is not None:
                            similarity, nearest = accepted.nearest(res["instruction"])
                if reason is None:
                    accepted_n += 1
                    row = make_row(
                        res["instruction"],
                        source=f"generation:round_{round_no}",
                        round_no=round_no,
                        parent_id=parent["id"],
                        kind=kind,
                    )
                    accepted_ids.add(row["id"])
                    new_rows.append(row)
                elif reason != "surplus":
                    reasons[reason] += 1
                candidates.append(
                    {
                        "attempt": a,
                        "kind": kind,
                        "parent_id": parent["id"],
                        "parent_instruction": parent["instruction"],
                        "seed": seed,
                        "instruction": res["instruction"],
                        "finish_reason": res["finish_reason"],
                        "accepted": reason is None,
                        "reason": reason or "",
                        "nearest": nearest,
                        "similarity": similarity,
                    }
                )
            dedup_s += time.monotonic() - checking
            attempt += wave
        stats[kind] = {
            "target": target,
            "parents": len(order),
            "attempts": attempt,
            "accepted": accepted_n,
            "shortfall": target - accepted_n,
            "rejected": dict(reasons),
        }
    new_pool = build_pool(new_rows) if new_rows else POOL_SCHEMA.empty_table()
    stats |= rejection_summary(candidates, family_of)  # candidates, accepted, rejected, ...
    stats["new_instructions"] = new_pool.num_rows
    stats["dedup_s"] = round(dedup_s, 2)
    attempts = stats["hard"]["attempts"] + stats["easy"]["attempts"]
    stats["attempts_per_accepted"] = (
        round(attempts / new_pool.num_rows, 3) if new_pool.num_rows else None
    )
    return (
        new_pool,
        pa.Table.from_pylist(candidates, schema=CANDIDATE_SCHEMA),
        {"metrics": stats, "api": merge_usage(*usages)},
    )


def pool_common(pool, loop: LoopConfig) -> frozenset[str] | None:
    """The template words the pool's index uses (same_payload), for the accepted half."""
    if loop.similarity != "same_payload":
        return None
    return pool.template_words()


class AcceptedCandidates:
    """The order-dependent half of dedup: the candidates accepted so far this round."""

    def __init__(self, threshold: float, common: frozenset[str] | None):
        self.index = RougeIndex(threshold=threshold, common=common)
        self.texts: list[str] = []

    def reason(self, text: str) -> str | None:
        """None (and ``text`` remembered) when no accepted candidate is too like it."""
        if self.index.exceeds(text):
            return "similar_to_accepted"
        self.index.add(text)
        self.texts.append(text)
        return None

    def nearest(self, text: str) -> tuple[float, str | None]:
        score, doc = self.index.max_match(text)
        return score, self.texts[doc] if doc >= 0 else None


class ParentOrder:
    """The order parents are drawn in: the judged rows of a kind (all ok rows for random
    selection), sorted by id, shuffled by a seeded generator, cycled. Built from ids alone
    (an Arrow column, a permutation of ints); the texts are read only for the parents a
    round's attempt budget can reach."""

    def __init__(self, windows: Callable[[], Iterable[pa.Table]], label: str | None, seed: str):
        import array

        import pyarrow.compute as pc

        self.windows = windows
        chunks = []
        for window in windows():
            keep = pc.equal(window["status"], "ok")
            if label is not None:
                keep = pc.and_(keep, pc.equal(window["label"], label))
            chunks.append(window.filter(keep).column("id"))
        ids = (
            pa.chunked_array(chunks, type=pa.string())
            if chunks
            else pa.chunked_array([], pa.string())
        )
        self.ids = ids.take(pc.sort_indices(ids)).combine_chunks() if len(ids) else ids
        # the same permutation shuffling the sorted rows themselves gives (it depends only
        # on their number and the seed), in 8 bytes a row
        self.perm = array.array("q", range(len(self.ids)))
        random.Random(seed).shuffle(self.perm)

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, attempts: int) -> list[dict]:
        """The parent of each attempt 0..attempts-1 (cycling through the order)."""
        import pyarrow.compute as pc

        if not len(self.ids) or attempts <= 0:
            return []
        picks = [self.perm[k % len(self.ids)] for k in range(attempts)]
        wanted = self.ids.take(pa.array(sorted(set(picks)), type=pa.int64()))
        by_id: dict[str, dict] = {}
        for window in self.windows():
            hits = window.filter(pc.is_in(window["id"], value_set=wanted))
            for r in hits.select(["id", "instruction", "input"]).to_pylist():
                by_id[r["id"]] = r
        return [by_id[self.ids[p].as_py()] for p in picks]


class GeneratorWroteNothing(LionError):
    """Every candidate the generator wrote this round was rejected."""


def check_candidates(candidates: pa.Table, model: str) -> None:
    """Fail generation when the generator wrote candidates and the filters accepted none of
    them: the next round would train on nothing new. Say which model, why they were
    rejected, two of them, and what to change."""
    rows = candidates.to_pylist()
    if not rows or any(r["accepted"] for r in rows):
        return
    reasons = Counter(r["reason"] for r in rows)
    shown = " | ".join(repr(" ".join((r["instruction"] or "").split())[:160]) for r in rows[:2])
    raise GeneratorWroteNothing(
        f"the generator ({model}) wrote {len(rows)} candidates and none was accepted ("
        + ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())
        + f"). Two of them: {shown}. Use a generator model that answers with one new "
        "instruction, raise generator.max_tokens if its replies are cut off, or loosen "
        "loop.rouge_threshold / loop.min_words if the rejections are similar_* or too_short"
    )
