"""Student inference: the batched Ray Data stage against one prompt at a time.

    python -m bench.student_inference [--prompts 2048] [--max-new-tokens 32]

Both run the demo's tiny student (built locally) on the same sandbox prompts, greedy,
generating ``max_new_tokens`` each (random weights never emit EOS, so both do the same
work). The stage's time includes starting its actor and loading the model (a fixed few
seconds, reported as startup_s; steady_tokens_per_s excludes it); the baseline
runs in-process with the model already loaded, on a sample of ``--sequential-prompts``
prompts (its per-token rate does not depend on how many). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from lion_ray.config import ClusterConfig, StudentConfig, load_config
from lion_ray.engines.cluster import init_ray
from lion_ray.engines.inference import HFGenerator, student_answers
from lion_ray.logic.pools import import_records
from lion_ray.sandbox.tasks import generate_tasks
from lion_ray.student import init_student


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=2048)
    parser.add_argument("--sequential-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    demo = load_config("configs/demo.yaml")
    init_ray(ClusterConfig(num_cpus=8), quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        info = init_student(f"{tmp}/student", demo.student.tiny)
        tasks = generate_tasks(args.prompts, seed=1)
        pool = import_records([(t.as_record(), "bench") for t in tasks], source="bench")[0]
        cfg = StudentConfig(
            model_path=f"{tmp}/student",
            prompt_format="compact",
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            cpus_per_engine=2,
        )

        t = time.perf_counter()
        table, summary = student_answers(pool, cfg, show_progress=False)
        batched_s = time.perf_counter() - t
        batched_tokens = sum(table.column("completion_tokens").to_pylist())
        # the same batches in-process: the stage's time minus this is its fixed startup
        inproc = HFGenerator(
            f"{tmp}/student",
            prompt_format="compact",
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
        t = time.perf_counter()
        inproc.generate([(task.instruction, "") for task in tasks])
        steady_s = time.perf_counter() - t

        one = HFGenerator(
            f"{tmp}/student",
            prompt_format="compact",
            max_new_tokens=args.max_new_tokens,
            batch_size=1,
        )
        sample = [(task.instruction, "") for task in tasks[: args.sequential_prompts]]
        t = time.perf_counter()
        out = [
            one.generate([item])[0] for item in sample
        ]  # the original's loop: one prompt per generate()
        one_s = time.perf_counter() - t
        one_tokens = sum(o["completion_tokens"] for o in out)

    batched_tps = batched_tokens / batched_s
    one_tps = one_tokens / one_s
    print(
        json.dumps(
            {
                "prompts": args.prompts,
                "max_new_tokens": args.max_new_tokens,
                "student_parameters": info["parameters"],
                "batched_rows_ok": summary["ok"],
                "batched_wall_s": round(batched_s, 2),
                "batched_tokens_per_s": round(batched_tps, 1),
                "startup_s": round(max(0.0, batched_s - steady_s), 2),
                "steady_tokens_per_s": round(batched_tokens / steady_s, 1),
                "one_at_a_time_prompts": len(sample),
                "one_at_a_time_wall_s": round(one_s, 2),
                "one_at_a_time_tokens_per_s": round(one_tps, 1),
                "speedup_vs_one_at_a_time": round(batched_tps / one_tps, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
