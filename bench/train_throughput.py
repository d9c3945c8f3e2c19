"""Imitation fine-tuning throughput: packing against padding, 1 worker against 2, and LoRA
against full fine-tuning.

    python -m bench.train_throughput [--examples 600] [--epochs 2]

Fine-tunes the demo's tiny student (built locally) with Ray Train + DeepSpeed ZeRO-2 on CPU
(gloo), on what a teacher's answers look like: lengths that vary a lot. The data mixes the
175 self-instruct seed tasks with their real outputs (long, up to the 256-token limit) and
sandbox tasks answered by the sandbox teacher (short). Throughput is tokens of real data (padding excluded) per second of the training
loop, so worker start-up (the same for every run) is left out. The LoRA and full arms
train a wider student (--lora-hidden, 6 layers, ~40M parameters) on --lora-examples rows,
one sequence per micro-batch, so that gradients and optimizer state, not activations and
the runtime, decide the workers' peak memory. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from lion_ray.config import ClusterConfig, LoraConfig, StudentConfig, TrainConfig, load_config
from lion_ray.engines.cluster import init_ray
from lion_ray.engines.training import train_student
from lion_ray.logic.pools import ANSWER_SCHEMA
from lion_ray.sandbox.tasks import generate_tasks
from lion_ray.student import init_student

COMPACT = StudentConfig(prompt_format="compact")  # the tiny students' text template

SEEDS = Path(__file__).resolve().parents[1] / "tests" / "data" / "alpaca_seed_tasks.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lora-hidden", type=int, default=768)
    parser.add_argument("--lora-examples", type=int, default=200)
    parser.add_argument(
        "--overhead-only",
        action="store_true",
        help="only the stage against a plain loop (packing_2w and plain_loop)",
    )
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
        wide_student = demo.student.tiny.model_copy(
            update={
                "hidden_size": args.lora_hidden,
                "num_layers": 6,
                "num_heads": args.lora_hidden // 64,
                "intermediate_size": 4 * args.lora_hidden,
            }
        )
        init_student(f"{tmp}/wide", wide_student)
        arms = [
            ("padding_2w", False, 2, None),
            ("packing_2w", True, 2, None),
            ("packing_1w", True, 1, None),
            ("full_wide", True, 2, None),
            ("lora_wide", True, 2, LoraConfig(r=16, dropout=0.0, target_modules="all-linear")),
        ]
        if args.overhead_only:
            arms = [a for a in arms if a[0] == "packing_2w"]
        for name, packing, workers, lora in arms:
            wide = name.endswith("wide")
            cfg = TrainConfig(
                zero_stage=2,
                lr=3e-3,
                epochs=1 if wide else args.epochs,
                max_length=256,
                micro_batch_size=1 if wide else 8,
                effective_batch_size=16,
                packing=packing,
                workers=workers,
                checkpoint_every_steps=10**6,
                warmup_ratio=0.05,
                lora=lora,
            )
            started = time.monotonic()
            m = train_student(
                answers.slice(0, args.lora_examples) if wide else answers,
                cfg,
                base_model=f"{tmp}/wide" if wide else f"{tmp}/student",
                out_uri=f"{tmp}/{name}",
                storage_path=f"{tmp}/store",
                name=name,
                student=COMPACT,
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
                    "peak_rss_mb",
                    "parameters",
                    "trainable_parameters",
                    "setup_s",
                    "export_s",
                )
            }
            runs[name]["stage_s"] = time.monotonic() - started
            print(name, json.dumps(runs[name]), flush=True)
            if name == "packing_2w":  # the same steps in one process, no Ray, no DeepSpeed
                plain_s = plain_loop(answers, cfg, f"{tmp}/student")
                runs["plain_loop"] = {"train_s": plain_s, "step": m["step"]}
                print("plain_loop", json.dumps(runs["plain_loop"]), flush=True)
    stage = runs["packing_2w"]
    overhead = {
        "stage_s": round(stage["stage_s"], 1),
        "stage_loop_s": round(stage["train_s"], 1),
        "stage_setup_s": stage["setup_s"],
        "plain_loop_s": round(runs["plain_loop"]["train_s"], 1),
        # what Ray Train + DeepSpeed cost beyond a plain loop of the same steps
        "stage_over_plain": round(stage["stage_s"] / runs["plain_loop"]["train_s"], 2),
        "loop_over_plain": round(stage["train_s"] / runs["plain_loop"]["train_s"], 2),
        "startup_and_export_s": round(stage["stage_s"] - stage["train_s"], 1),
    }
    if args.overhead_only:
        print(json.dumps({"overhead": overhead, "runs": runs}))
        return
    lora, full = runs["lora_wide"], runs["full_wide"]
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
                "lora_loss_first": round(lora["loss_first"], 4),
                "lora_loss_last": round(lora["loss_last"], 4),
                "lora_trainable_fraction": round(
                    lora["trainable_parameters"] / lora["parameters"], 4
                ),
                "lora_tokens_per_s": round(lora["real_tokens_per_s"], 1),
                "full_tokens_per_s": round(full["real_tokens_per_s"], 1),
                "lora_peak_rss_mb": lora["peak_rss_mb"],
                "full_peak_rss_mb": full["peak_rss_mb"],
                "wide_parameters": full["parameters"],
                "overhead": overhead,
                "runs": runs,
            }
        )
    )


def plain_loop(answers: pa.Table, train: TrainConfig, base: str) -> float:
    """Seconds a single-process torch loop takes for the stage's optimizer steps: the same
    packed sequences, micro-batches, accumulation, AdamW and schedule, no Ray or DeepSpeed."""
    import math
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from lion_ray.engines.training import build_sequences, cosine_with_warmup
    from lion_ray.formats import PromptFormat
    from lion_ray.logic.examples import pad_batch
    from lion_ray.models import load_tokenizer

    tokenizer = load_tokenizer(base)
    fmt = PromptFormat(tokenizer, COMPACT.prompt_format, "")
    rows = [r for r in answers.to_pylist() if r["status"] == "ok"]
    seqs, _ = build_sequences(rows, fmt, train.max_length, train.packing)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr)
    batch = train.effective_batch_size
    per_epoch = math.ceil(len(seqs) / batch)
    total = per_epoch * train.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total, math.ceil(train.warmup_ratio * total))
    )
    micro = train.micro_batch_size
    started = time.monotonic()
    model.train()
    for step in range(total):
        epoch, k = divmod(step, per_epoch)
        order = list(range(len(seqs)))
        random.Random(epoch).shuffle(order)
        picked = [seqs[order[(k * batch + j) % len(order)]] for j in range(batch)]
        for i in range(0, batch, micro):
            padded = pad_batch(picked[i : i + micro], tokenizer.pad_token_id)
            inputs = {
                key: torch.tensor(padded[key]) for key in ("input_ids", "labels", "position_ids")
            }
            (model(**inputs).loss * micro / batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return time.monotonic() - started


if __name__ == "__main__":
    main()
