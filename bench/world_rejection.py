"""How much of generation the ROUGE-L rule rejects, per task family, in the sandbox world.

    python -m bench.world_rejection [--seeds 3] [--first-seed 0] [--similarity rouge_l]

The `random` arm of bench.hard_mining at its full size (800 difficulty-1 seed tasks,
200 hard-rule + 100 easy-rule generator calls' worth of new instructions per round, the
Train Pool accumulating), with no student: in that arm generation does not depend on the
student, so rounds 1 and 2 of generation run in-process against the sandbox world's own
functions. Prints, per family, the share of round-2 candidates the paper's rule (ROUGE-L
F > 0.7 against the Cache Pool or an accepted candidate) rejects. docs/method.md reports it
for the world before and after the generator learned to write like an LLM; the world was
fixed on this figure alone, never on held-out accuracy.

It also says how well a ``loop.similarity`` rule does what it is for, against the world's
ground truth: a candidate that asks the same question (family and payload) as a Cache Pool
instruction or an earlier accepted candidate is a copy, which the rule should reject; any
other is a new question, which it should keep. Validation seeds (``--first-seed 100``)
chose between the rules; the ablation's seeds are 0..4.
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
from lion_ray.logic.dedup import SIMILARITIES
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


def _question(text: str) -> tuple | None:
    task = parse_instruction(text)
    return (task.family, tuple(sorted(task.params.items()))) if task else None


def round_two_rejections(seed: int, similarity: str) -> tuple[Counter, Counter, Counter]:
    """Per family: round-2 candidates and those rejected as similar in the random arm; and
    (copy or new question, rejected or kept) counts against the ground truth."""
    tasks = generate_tasks(800, seed=seed, max_difficulty=1)
    pool, _ = import_records(
        [(t.as_record(), f"s:{i}") for i, t in enumerate(tasks)], source="sandbox"
    )
    loop = LoopConfig(
        selection="random",
        hard_per_round=200,
        easy_per_round=100,
        min_words=2,
        seed=seed,
        similarity=similarity,
    )
    client = WorldClient()
    for round_no in (1, 2):
        judged, _ = unjudged(pool)
        new, candidates, _ = generate(judged, pool, loop, client, round_no=round_no)
        _, pool = next_pools(pool, pool, new, "accumulate")
        if round_no == 1:
            known = {_question(t) for t in pool.column("instruction").to_pylist()}
    seen, rejected, truth = Counter(), Counter(), Counter()
    for c in candidates.to_pylist():  # in the order the rule saw them
        if c["reason"] in ("surplus", "api_failed"):
            continue
        task = parse_instruction(c["instruction"])
        family = task.family if task else "other"
        seen[family] += 1
        similar = c["reason"].startswith("similar")
        rejected[family] += similar
        if c["reason"] == "" or similar:
            question = _question(c["instruction"])
            truth[("copy" if question in known else "new", "rejected" if similar else "kept")] += 1
            if c["accepted"]:
                known.add(question)
    return seen, rejected, truth


def _share(truth: Counter, kind: str) -> float | None:
    n = truth[kind, "rejected"] + truth[kind, "kept"]
    return round(truth[kind, "rejected"] / n, 3) if n else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--similarity", default="rouge_l", choices=SIMILARITIES)
    args = parser.parse_args()
    started = time.monotonic()
    seen, rejected, truth = Counter(), Counter(), Counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        s, r, t = round_two_rejections(seed, args.similarity)
        seen.update(s)
        rejected.update(r)
        truth.update(t)
    share = {f: round(rejected[f] / seen[f], 3) for f in sorted(seen)}
    for family, value in share.items():
        print(f"{family:14s} {seen[family]:6d} candidates  {value:6.1%} rejected as similar")
    print(
        json.dumps(
            {
                "seeds": args.seeds,
                "first_seed": args.first_seed,
                "similarity": args.similarity,
                "rejected_share_by_family": share,
                "rejected_share": round(sum(rejected.values()) / sum(seen.values()), 3),
                "candidates": sum(seen.values()),
                # of the copies, the share rejected; of the new questions, the share rejected
                "copies_rejected": _share(truth, "copy"),
                "new_questions_rejected": _share(truth, "new"),
                "copies": truth["copy", "rejected"] + truth["copy", "kept"],
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
