"""How much of generation the ROUGE-L rule rejects, per task family, in the sandbox world.

    python -m bench.world_rejection [--seeds 3]

The `random` arm of bench.hard_mining at its full size (800 difficulty-1 seed tasks,
200 hard-rule + 100 easy-rule generator calls' worth of new instructions per round, the
Train Pool accumulating), with no student: in that arm generation does not depend on the
student, so rounds 1 and 2 of generation run in-process against the sandbox world's own
functions. Prints, per family, the share of round-2 candidates the paper's rule (ROUGE-L
F > 0.7 against the Cache Pool or an accepted candidate) rejects. docs/method.md reports it
for the world before and after the generator learned to write like an LLM; the world was
fixed on this figure alone, never on held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

from lion_ray.config import LoopConfig
from lion_ray.discrimination import unjudged
from lion_ray.generation import generate
from lion_ray.logic.chat import ChatResult
from lion_ray.logic.pools import import_records, next_pools
from lion_ray.sandbox import world
from lion_ray.sandbox.tasks import generate_tasks, parse_instruction


class WorldClient:
    """A ChatClient answering from the sandbox world's pure functions, in-process."""

    model = "sandbox"

    def ask(self, requests, label=""):
        return [
            ChatResult(r.request_id, world.reply(r.messages, r.seed)[1], "stop", attempts=1)
            for r in requests
        ]


def round_two_rejections(seed: int) -> tuple[Counter, Counter]:
    """(candidates, rejected as similar) per family in round 2 of the random arm."""
    tasks = generate_tasks(800, seed=seed, max_difficulty=1)
    pool, _ = import_records(
        [(t.as_record(), f"s:{i}") for i, t in enumerate(tasks)], source="sandbox"
    )
    loop = LoopConfig(
        selection="random", hard_per_round=200, easy_per_round=100, min_words=2, seed=seed
    )
    client = WorldClient()
    for round_no in (1, 2):
        judged, _ = unjudged(pool)
        new, candidates, _ = generate(judged, pool, loop, client, round_no=round_no)
        _, pool = next_pools(pool, pool, new, "accumulate")
    seen, rejected = Counter(), Counter()
    for c in candidates.to_pylist():
        if c["reason"] in ("surplus", "api_failed"):
            continue
        task = parse_instruction(c["instruction"])
        family = task.family if task else "other"
        seen[family] += 1
        rejected[family] += c["reason"].startswith("similar")
    return seen, rejected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    started = time.monotonic()
    seen, rejected = Counter(), Counter()
    for seed in range(args.seeds):
        s, r = round_two_rejections(seed)
        seen.update(s)
        rejected.update(r)
    share = {f: round(rejected[f] / seen[f], 3) for f in sorted(seen)}
    for family, value in share.items():
        print(f"{family:14s} {seen[family]:6d} candidates  {value:6.1%} rejected as similar")
    print(
        json.dumps(
            {
                "seeds": args.seeds,
                "rejected_share_by_family": share,
                "rejected_share": round(sum(rejected.values()) / sum(seen.values()), 3),
                "candidates": sum(seen.values()),
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
