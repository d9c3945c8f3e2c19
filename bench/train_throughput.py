"""Imitation fine-tuning throughput: packing against padding, 1 worker against 2.

    python -m bench.train_throughput [--examples 600] [--epochs 2]

Fine-tunes the demo's tiny student (built locally) with Ray Train + DeepSpeed ZeRO-2 on CPU
(gloo), on what a teacher's answers look like: lengths that vary a lot. The data mixes the
175 self-instruct seed tasks with their real outputs (long, up to the 256-token limit) and
sandbox tasks answered by the sandbox teacher (short). Throughput is tokens of real data (padding excluded) per second of the training
loop, so worker start-up (the same for every run) is left out. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pyarrow as pa

from lion_ray.config import ClusterConfig, TrainConfig, load_config
from lion_ray.engines.cluster import init_ray
from lion_ray.engines.training import train_student
from lion_ray.logic.pools import ANSWER_SCHEMA
from lion_ray.sandbox.tasks import generate_tasks
from lion_ray.student import init_student

SEEDS = Path(__file__).resolve().parents[1] / "tests" / "data" / "alpaca_seed_tasks.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    demo = load_config("configs/demo.yaml")
    init_ray(ClusterConfig(num_cpus=8), quiet=True)
    seeds = [json.loads(line) for line in SEEDS.read_text().splitlines()]
    examples = [
        (s["instruction"], s["instances"][0]["input"], s["instances"][0]["output"]) for s in seeds
    ]
    examples += [
        (t.instruction, "", t.answer) for t in generate_tasks(args.examples - len(examples), seed=5)
    ]
    rows = [
        {
            "id": f"{i:05d}",
            "instruction": inst,
            "input": inp,
            "answer": out,
            "status": "ok",
            "error": "",
            "finish_reason": "stop",
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cost_usd": 0.0,
            "cached": False,
        }
        for i, (inst, inp, out) in enumerate(examples)
    ]
    answers = pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        init_student(f"{tmp}/student", demo.student.tiny)
        for name, packing, workers in [
            ("padding_2w", False, 2),
            ("packing_2w", True, 2),
            ("packing_1w", True, 1),
        ]:
            cfg = TrainConfig(
                zero_stage=2,
                lr=3e-3,
                epochs=args.epochs,
                max_length=256,
                micro_batch_size=8,
                effective_batch_size=16,
                packing=packing,
                workers=workers,
                checkpoint_every_steps=10**6,
                warmup_ratio=0.05,
            )
            m = train_student(
                answers,
                cfg,
                base_model=f"{tmp}/student",
                out_uri=f"{tmp}/{name}",
                storage_path=f"{tmp}/store",
                name=name,
                template="compact",
                show_progress=False,
            )
            runs[name] = {
                k: m[k]
                for k in (
                    "real_tokens_per_s",
                    "target_tokens_per_s",
                    "train_s",
                    "loss_first",
                    "loss_last",
                    "step",
                    "sequences",
                )
            }
            print(name, json.dumps(runs[name]), flush=True)
    print(
        json.dumps(
            {
                "examples": args.examples,
                "epochs": args.epochs,
                "packing_speedup": round(
                    runs["packing_2w"]["real_tokens_per_s"]
                    / runs["padding_2w"]["real_tokens_per_s"],
                    2,
                ),
                "two_worker_speedup": round(
                    runs["packing_2w"]["real_tokens_per_s"]
                    / runs["packing_1w"]["real_tokens_per_s"],
                    2,
                ),
                "loss_first": round(runs["packing_2w"]["loss_first"], 4),
                "loss_last": round(runs["packing_2w"]["loss_last"], 4),
                "tokens_per_s": round(runs["packing_2w"]["real_tokens_per_s"], 1),
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
