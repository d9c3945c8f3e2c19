"""ROUGE-L dedup: lion-ray's exact fast path against the rouge-score loop over all pairs.

    python -m bench.dedup [--pool 20000] [--candidates 2000] [--reference-candidates 300]

Corpus: instruction-like sentences from a word-bigram model of the 175 self-instruct seed
tasks (instructions and outputs), sandbox tasks, and near-duplicates (1-3 words changed) of
pool texts and of earlier candidates; 2 to 40 words long. Deterministic.

The reference is the original's method: for each candidate in order, rouge-score's
``score(candidate, text)`` against every pool text and every accepted candidate, spread
over a process pool (created once here, not once per candidate as the original did, and
given the pool once at start: both favour the reference). It is too slow to run on all
candidates, so it runs on the first ``--reference-candidates`` (the decisions of a prefix
do not depend on later candidates), its time is scaled to all candidates, and the two
decision lists are compared on that prefix. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import time
from collections import defaultdict
from pathlib import Path

from rouge_score import rouge_scorer

from lion_ray.logic.dedup import Deduper, naive_decisions
from lion_ray.sandbox.tasks import generate_tasks

SEEDS = Path(__file__).resolve().parents[1] / "tests" / "data" / "alpaca_seed_tasks.jsonl"
FILLERS = ["please", "briefly", "new", "the", "short", "detailed", "simple", "two", "every", "own"]


def _sentences() -> list[list[str]]:
    out = []
    for line in SEEDS.read_text().splitlines():
        rec = json.loads(line)
        for text in [rec["instruction"]] + [i["output"] for i in rec["instances"]]:
            for s in text.replace("\n", " ").split(". "):
                words = s.split()
                if len(words) >= 3:
                    out.append(words)
    return out


def _bigram_model(sentences):
    nxt = defaultdict(list)
    for words in sentences:
        for a, b in zip(["<s>"] + words, words + ["</s>"], strict=True):
            nxt[a].append(b)
    return nxt


def _sample(nxt, rng, min_words=4, max_words=40) -> str:
    for _ in range(100):
        words, w = [], "<s>"
        target = rng.randint(min_words, max_words)
        while len(words) < target:
            w = rng.choice(nxt[w]) if nxt[w] else rng.choice(nxt["<s>"])
            if w == "</s>":
                if len(words) >= min_words:
                    break
                w = "<s>"
                continue
            words.append(w)
        if len(words) >= min_words:
            return " ".join(words)
    return "Write a short note."


def _perturb(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(words))
        op = rng.randrange(3)
        if op == 0 and len(words) > 4:
            del words[i]
        elif op == 1:
            words.insert(i, rng.choice(FILLERS))
        else:
            words[i] = rng.choice(FILLERS)
    return " ".join(words)


def build_corpus(n_pool: int, n_cand: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    nxt = _bigram_model(_sentences())
    sandbox = [t.instruction for t in generate_tasks(n_pool // 5 + n_cand // 5, seed=seed)]
    pool: list[str] = []
    while len(pool) < n_pool:
        r = rng.random()
        if r < 0.7:
            pool.append(_sample(nxt, rng))
        elif r < 0.9 and sandbox:
            pool.append(sandbox.pop())
        elif pool:
            pool.append(_perturb(rng.choice(pool), rng))
    cands: list[str] = []
    while len(cands) < n_cand:
        r = rng.random()
        if r < 0.6:
            cands.append(_sample(nxt, rng))
        elif r < 0.7 and sandbox:
            cands.append(sandbox.pop())
        elif r < 0.9:
            cands.append(_perturb(rng.choice(pool), rng))
        elif cands:
            cands.append(_perturb(rng.choice(cands), rng))
    return pool, cands


_POOL: list[str] = []
_SCORER = None


def _init(pool):
    global _POOL, _SCORER
    _POOL = pool
    _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def _max_f(args) -> float:
    candidate, lo, hi, extra = args
    texts = _POOL[lo:hi] + extra
    return max((_SCORER.score(candidate, t)["rougeL"].fmeasure for t in texts), default=0.0)


def reference(
    pool: list[str], candidates: list[str], threshold: float, procs: int
) -> tuple[list[bool], float]:
    decisions, accepted = [], []
    step = -(-len(pool) // procs)
    with mp.get_context("fork").Pool(procs, initializer=_init, initargs=(pool,)) as workers:
        t = time.perf_counter()
        for cand in candidates:
            jobs = [
                (cand, lo, lo + step, accepted if lo == 0 else [])
                for lo in range(0, len(pool), step)
            ]
            keep = max(workers.map(_max_f, jobs)) <= threshold
            if keep:
                accepted.append(cand)
            decisions.append(keep)
        elapsed = time.perf_counter() - t
    return decisions, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pool", type=int, default=20_000)
    parser.add_argument("--candidates", type=int, default=2_000)
    parser.add_argument("--reference-candidates", type=int, default=300)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--procs", type=int, default=max(2, mp.cpu_count()))
    args = parser.parse_args()

    pool, cands = build_corpus(args.pool, args.candidates)
    t = time.perf_counter()
    deduper = Deduper(pool, args.threshold)
    ours = [deduper.offer(c) for c in cands]
    ours_s = time.perf_counter() - t

    # the same_payload arm (loop.similarity): same index, compared only with same-payload texts
    t = time.perf_counter()
    payload_deduper = Deduper(pool, args.threshold, "same_payload")
    payload_decisions = [payload_deduper.offer(c) for c in cands]
    payload_s = time.perf_counter() - t
    n_check = min(200, len(cands))
    payload_exact = payload_decisions[:n_check] == naive_decisions(
        pool, cands[:n_check], args.threshold, "same_payload"
    )

    n_ref = min(args.reference_candidates, len(cands))
    ref, ref_s = reference(pool, cands[:n_ref], args.threshold, args.procs)
    ref_full_s = ref_s / n_ref * len(cands)
    lengths = sorted(len(x.split()) for x in pool)
    print(
        json.dumps(
            {
                "pool": len(pool),
                "candidates": len(cands),
                "pool_words": {
                    "min": lengths[0],
                    "median": lengths[len(lengths) // 2],
                    "max": lengths[-1],
                },
                "accepted": sum(ours),
                "ours_s": round(ours_s, 3),
                "reference_candidates_run": n_ref,
                "reference_procs": args.procs,
                "reference_s_on_sample": round(ref_s, 2),
                "reference_s_scaled_to_all": round(ref_full_s, 1),
                "reference_scaled": n_ref < len(cands),
                "speedup": round(ref_full_s / ours_s, 1),
                "identical_decisions": ours[:n_ref] == ref,
                "identical_decisions_checked_on": n_ref,
                "rejections_in_checked_prefix": n_ref - sum(ref),
                "same_payload": {
                    "accepted": sum(payload_decisions),
                    "seconds": round(payload_s, 3),
                    "identical_to_its_reference_on": n_check if payload_exact else 0,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
