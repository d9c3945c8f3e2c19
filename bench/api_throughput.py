"""API throughput at the provider's limit: lion-ray's engine vs ray.data.llm's HTTP processor
vs one request at a time, against the sandbox with a rate limit, latency and 5% 5xx; and the
same requests through the Batch API (5% of lines failing once) at the batch price.

    python -m bench.api_throughput [--limit 1200] [--rows 1200]
    python -m bench.api_throughput --rpm 10000      # the paper's tier: online, >= 2 minutes

The last line is JSON: achieved_over_limit (requests the provider accepted per minute while
traffic flowed, over its limit), rejected_429_fraction, lost_rows, speedup_vs_ray_http
(completed rows per minute, ours over theirs), the batch arm (batch_lost_rows,
batch_resubmitted, batch_cost_over_online: its cost over the online arm's for the same rows)
and the raw figures of every contender. With --rpm 10000: achieved_over_limit_10k.
"""

from __future__ import annotations

import argparse
import json
import time

from openai import OpenAI

from lion_ray.config import ClusterConfig, EndpointConfig
from lion_ray.engines.api import ApiEngine
from lion_ray.engines.cluster import init_ray
from lion_ray.logic import prompts
from lion_ray.logic.chat import ChatRequest
from lion_ray.sandbox.server import SandboxProcess, ServerOptions
from lion_ray.sandbox.tasks import generate_tasks


def provider_view(stats: dict, limit: int) -> dict:
    accepted = stats["served"] + stats["rejected"]["server_error"]
    span = stats["accepted_span_s"]
    rpm = (accepted - 1) / span * 60 if span else 0.0
    total = stats["requests"]
    return {
        "accepted_rpm": round(rpm, 1),
        "achieved_over_limit": round(rpm / limit, 4),
        "rejected_429_fraction": round(stats["rejected_429"] / total, 4) if total else 0.0,
        "max_accepted_in_60s": stats["max_accepted_in_window"]["requests"],
    }


PRICES = {"price_per_1k_input": 1.0, "price_per_1k_output": 1.0}  # illustrative


def run_ours(sb: SandboxProcess, tasks, limit: int, tmp: str) -> dict:
    # enough requests in flight for the limit at ~200 ms latency, with room for retries
    actors, concurrency = (2, 16) if limit <= 2000 else (4, 32)
    ep = EndpointConfig(
        base_url=sb.base_url,
        model="sandbox",
        requests_per_minute=limit,
        tokens_per_minute=1000 * limit,  # requests, not tokens, are the limit here
        num_actors=actors,
        concurrency=concurrency,
        max_tokens=64,
        max_retries=8,
        **PRICES,
    )
    figures, _ = ask_teacher(sb, ep, tasks, f"{tmp}/online")
    stats = sb.stats()
    return figures | {
        "rows_per_min_steady": round(figures["completed_rows"] / stats["accepted_span_s"] * 60, 1),
        **provider_view(stats, limit),
    }


def run_batch(sb: SandboxProcess, tasks, tmp: str) -> dict:
    """The same requests through the Batch API; failed lines are sent once more, in a batch."""
    ep = EndpointConfig(
        base_url=sb.base_url,
        model="sandbox",
        max_tokens=64,
        mode="batch",
        batch_poll_s=0.5,
        **PRICES,
    )
    figures, engine = ask_teacher(sb, ep, tasks, f"{tmp}/batch")
    batch = sb.stats()["batch"]
    return figures | {
        "batches": engine.batch_stats["batches"],
        "failed_lines": batch["failed_lines"],
        "resubmitted": engine.batch_stats["resubmitted"],
        "lines_resubmitted_after_success": batch["lines_resubmitted_after_success"],
    }


def ask_teacher(sb: SandboxProcess, ep: EndpointConfig, tasks, run_dir: str):
    """Every task to the teacher through lion-ray's engine (a fresh run directory)."""
    engine = ApiEngine(
        ep,
        role="teacher",
        cache_dir=f"{run_dir}/cache",
        ledger_dir=f"{run_dir}/spend",
        batch_dir=f"{run_dir}/batches",
        show_progress=False,
    )
    reqs = [
        ChatRequest(str(i), prompts.teacher_messages(t.instruction)) for i, t in enumerate(tasks)
    ]
    sb.reset_stats()
    t = time.perf_counter()
    results = engine.ask(reqs)
    elapsed = time.perf_counter() - t
    correct = sum(
        r.status == "ok" and r.text == task.answer for r, task in zip(results, tasks, strict=True)
    )
    return {
        "rows": len(tasks),
        "completed_rows": correct,
        "lost_rows": len(tasks) - correct,
        "wall_s": round(elapsed, 2),
        "cost_usd": round(sum(r.cost_usd for r in results), 6),
    }, engine


def run_ray_http(sb: SandboxProcess, tasks, limit: int) -> dict:
    import ray
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    actors = 2
    config = HttpRequestProcessorConfig(
        url=f"{sb.base_url}/chat/completions",
        headers={"Authorization": "Bearer unused"},
        qps=max(1, limit // 60 // actors),  # the same nominal rate, split over its actors
        concurrency=actors,
        batch_size=64,
        max_retries=8,
    )
    processor = build_processor(
        config,
        preprocess=lambda row: {
            "payload": {
                "model": "sandbox",
                "max_tokens": 64,
                "messages": prompts.teacher_messages(row["instruction"]),
            }
        },
        postprocess=lambda row: {
            "instruction": row["instruction"],
            "response": row["http_response"],
        },
    )
    ds = ray.data.from_items([{"instruction": t.instruction} for t in tasks])
    sb.reset_stats()
    t = time.perf_counter()
    error = None
    try:
        out = processor(ds).take_all()
    except Exception as exc:  # it raises when a row runs out of retries: the whole run is lost
        out, error = [], f"{type(exc).__name__}: {str(exc)[:200]}"
    elapsed = time.perf_counter() - t
    answers = {t.instruction: t.answer for t in tasks}
    correct = 0
    for row in out:
        resp = row["response"]
        choices = resp.get("choices") if isinstance(resp, dict) else None
        if choices and choices[0]["message"]["content"] == answers[row["instruction"]]:
            correct += 1
    stats = sb.stats()
    span = stats["accepted_span_s"]
    return {
        "rows": len(tasks),
        "completed_rows": correct,
        "lost_rows": len(tasks) - correct,
        "wall_s": round(elapsed, 2),
        "rows_per_min_steady": round(correct / span * 60, 1) if span else 0.0,
        "error": error,
        **provider_view(stats, limit),
    }


def run_sequential(sb: SandboxProcess, tasks, limit: int) -> dict:
    client = OpenAI(base_url=sb.base_url, api_key="unused", max_retries=8)
    sb.reset_stats()
    t = time.perf_counter()
    correct = 0
    for task in tasks:
        r = client.chat.completions.create(
            model="sandbox", messages=prompts.teacher_messages(task.instruction), max_tokens=64
        )
        correct += r.choices[0].message.content == task.answer
    elapsed = time.perf_counter() - t
    return {
        "rows": len(tasks),
        "completed_rows": correct,
        "wall_s": round(elapsed, 2),
        "rows_per_min_steady": round(correct / elapsed * 60, 1),
        **provider_view(sb.stats(), limit),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=1200, help="provider requests per minute")
    parser.add_argument(
        "--rpm",
        type=int,
        default=None,
        help="the paper's tier: online only at this limit, rows for at least two minutes",
    )
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--sequential-rows", type=int, default=100)
    parser.add_argument("--tmp", default="/tmp/lion-bench-api")
    args = parser.parse_args()

    import shutil

    shutil.rmtree(args.tmp, ignore_errors=True)
    init_ray(ClusterConfig(num_cpus=8), quiet=True)
    limit = args.rpm or args.limit
    rows = args.rows or (max(1200, limit * 2 + limit // 6) if args.rpm else 1200)
    tasks = generate_tasks(rows, seed=42)
    options = ServerOptions(
        rpm=limit,
        latency_ms=200,
        latency_sd_ms=50,
        error_rate=0.05,
        fault_seed=7,
        batch_delay_s=2.0,
        batch_fail_rate=0.05,
    )
    with SandboxProcess(options) as sb:
        ours = run_ours(sb, tasks, limit, args.tmp)
        print("ours", json.dumps(ours), flush=True)
        if args.rpm:
            print(
                json.dumps(
                    {
                        "limit_rpm": limit,
                        "rows": rows,
                        "achieved_over_limit_10k": ours["achieved_over_limit"],
                        "rejected_429_fraction": ours["rejected_429_fraction"],
                        "lost_rows": ours["lost_rows"],
                        "ours": ours,
                    }
                )
            )
            return
        theirs = run_ray_http(sb, tasks, limit)
        print("ray.data.llm http", json.dumps(theirs), flush=True)
        seq = run_sequential(sb, tasks[: args.sequential_rows], limit)
        print("one at a time", json.dumps(seq), flush=True)
        batch = run_batch(sb, tasks, args.tmp)
        print("batch", json.dumps(batch), flush=True)
    speedup = (
        ours["rows_per_min_steady"] / theirs["rows_per_min_steady"]
        if theirs["rows_per_min_steady"]
        else None
    )
    print(
        json.dumps(
            {
                "limit_rpm": limit,
                "rows": rows,
                "achieved_over_limit": ours["achieved_over_limit"],
                "rejected_429_fraction": ours["rejected_429_fraction"],
                "lost_rows": ours["lost_rows"],
                "speedup_vs_ray_http": round(speedup, 2) if speedup else None,
                "speedup_vs_one_at_a_time": round(
                    ours["rows_per_min_steady"] / seq["rows_per_min_steady"], 2
                ),
                "batch_lost_rows": batch["lost_rows"],
                "batch_resubmitted": batch["resubmitted"],
                "batch_cost_over_online": round(batch["cost_usd"] / ours["cost_usd"], 4),
                "ours": ours,
                "ray_http": theirs,
                "one_at_a_time": seq,
                "batch": batch,
            }
        )
    )


if __name__ == "__main__":
    main()
