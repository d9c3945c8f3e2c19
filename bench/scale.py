"""One round over 10K, 100K and 1M instructions: does a round's cost grow with its rows alone,
and does the driver's memory stay flat?

    python -m bench.scale                           # 10K, 100K and 1M (about 40 minutes here)
    python -m bench.scale --sizes 10000,100000      # a quicker look

Per size, one round of the sandbox world as a user resuming a large run has it: a seed pool
of N sandbox instructions (a lion-ray Parquet pool), the response cache (and its index)
holding the teacher's answers and the referee's reviews for all but a live slice of
``--live`` instructions, which go to the real sandbox over HTTP, as does the generator
(``--new`` new instructions). Training and the student's answers are recorded (a copy of
the initial student; the student answers the even-hashed half right), so the figures are
the stages that stream the pool: the seed pool, both teacher stages, the referee,
generation (its dedup index over the whole Cache Pool) and the next pools.

The two pool stages are short file copies (seconds even at 1M), where one sample is mostly
the machine's noise: the benchmark runs each ``--repeats`` times in place (they are
idempotent; the kernel's dirty pages are written out before each) and reports the median,
keeping every sample under ``samples_s``.

Each size runs in its own process (``--child``), which this one samples every 0.5 s: the
driver's peak resident memory (VmHWM) and the whole process tree's (the driver, Ray, the
sandbox, the API workers, the dedup index's actor). Prints one JSON line:

    {"sizes": {"N": {"driver_peak_mib", "tree_peak_mib", "stage_s": {...},
                     "us_per_row": {...}, "samples_s": {...}, "files", "run_dir_mib",
                     "wall_s"}},
     "growth": {"driver_peak_1m_over_100k", "us_per_row_1m_over_100k"}}

(the second growth figure is the largest ratio over the stages; absent when the sizes do
not include both 100K and 1M).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = (
    "round_1/pools.seed",
    "round_1/imitation.teacher",
    "round_1/discrimination.teacher",
    "round_1/discrimination.referee",
    "round_1/generation",
    "round_1/pools",
)


def settings(out: Path, n: int, new: int) -> list[str]:
    """The run's config overrides (on top of configs/demo.yaml)."""
    return [
        f"storage.run_dir={out / 'run'}",
        f"loop.seed_pool={out / 'seed.parquet'}",
        "loop.rounds=1",
        "loop.last_round_generates=true",
        f"loop.hard_per_round={new // 2}",
        f"loop.easy_per_round={new - new // 2}",
        "sandbox.heldout_tasks=0",
        "sandbox.max_difficulty=5",
        "serve.during_run=false",
        "train.workers=1",
        "teacher.num_actors=2",
        "referee.num_actors=2",
        "generator.num_actors=2",
    ]


def recorded_answer(instruction: str, answer: str) -> str:
    """The recorded student: right on half the instructions (by a hash), wrong on the rest."""
    import hashlib

    return answer if hashlib.sha256(instruction.encode()).digest()[0] % 2 == 0 else "no idea"


# --- the world a resumed run has: the seed pool and a filled cache ------------------------


def prepare(out: Path, n: int, live: int, roles=("teacher", "referee")) -> dict:
    """The seed pool, and the ``roles``' cache entries (with their index) for all but the
    first ``live`` rows."""
    import pyarrow as pa

    from lion_ray import storage
    from lion_ray.config import load_config
    from lion_ray.engines.api_wire import request_key
    from lion_ray.engines.cache import CacheIndex
    from lion_ray.logic.accounting import estimate_prompt_tokens, estimate_tokens
    from lion_ray.logic.chat import ChatRequest
    from lion_ray.logic.pools import POOL_SCHEMA, make_row
    from lion_ray.logic.prompts import referee_messages, teacher_messages
    from lion_ray.sandbox import world
    from lion_ray.sandbox.tasks import generate_tasks

    started = time.monotonic()
    cfg = load_config("demo", settings(out, n, 0))
    tasks = generate_tasks(n, seed=7, max_difficulty=5)
    rows = [make_row(t.instruction, source="sandbox") for t in tasks]
    storage.write_parquet(str(out / "seed.parquet"), pa.Table.from_pylist(rows, schema=POOL_SCHEMA))
    cache = {role: out / "run" / "cache" / role for role in roles}
    for role, path in cache.items():
        path.mkdir(parents=True, exist_ok=True)
        # a run with a ledger (an empty one: nothing was paid for the recorded answers)
        (out / "run" / "spend" / role).mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[str]] = {role: [] for role in roles}

    def entry(endpoint, messages: list[dict]) -> str:
        request = ChatRequest("x", messages)
        _, text = world.reply(messages)
        return json.dumps(
            {
                "key": request_key(endpoint, request),
                "text": text,
                "finish_reason": "stop",
                "prompt_tokens": estimate_prompt_tokens(messages),
                "completion_tokens": estimate_tokens(text),
                "cost_usd": 0.0,
            }
        )

    def flush(role: str, final: bool = False) -> None:
        if shards[role] and (final or len(shards[role]) >= 50_000):
            name = f"prefill-{len(list(cache[role].iterdir())):05d}.jsonl"
            (cache[role] / name).write_text("\n".join(shards[role]) + "\n")
            shards[role] = []

    for task in tasks[live:]:  # the first `live` rows stay uncached
        messages = teacher_messages(task.instruction, "")
        shards["teacher"].append(entry(cfg.teacher, messages))
        if "referee" in roles:
            teacher = world.reply(messages)[1]
            student = recorded_answer(task.instruction, teacher)
            for first, second in ((teacher, student), (student, teacher)):
                review = referee_messages(task.instruction, "", first, second)
                shards["referee"].append(entry(cfg.referee, review))
        for role in roles:
            flush(role)
    for role in shards:
        flush(role, final=True)
        CacheIndex(str(cache[role])).close()  # a resumed run's index holds them already
    return {"rows": n, "live": live, "prepare_s": round(time.monotonic() - started, 1)}


# --- the measured run ----------------------------------------------------------------------


REPEATED = {"pools.seed": "seed_pools", "pools": "next_pools"}


def child(out: Path, n: int, new: int, repeats: int) -> None:
    """One round (this process is the driver being measured)."""
    from rich.console import Console

    from lion_ray import storage
    from lion_ray.config import load_config
    from lion_ray.driver import Driver, StageResult, run
    from lion_ray.engines.student.rows import answers_table
    from lion_ray.logic.pools import ANSWER_SCHEMA
    from lion_ray.student import init_student

    class Recorded(Driver):
        """Training and the student's answers as recorded: the round's stages that stream
        the pool are measured, not a tiny model's compute."""

        def fine_tune(self, io):
            if not (out / "student").exists():
                init_student(str(out / "student"), self.cfg.student.tiny)
            shutil.copytree(out / "student", io.outputs["model"], dirs_exist_ok=True)
            return StageResult(rows=0)

        def student_answers(self, io):
            teacher = self.run.round_path(io.round, "discrimination", "teacher.parquet")
            rows = 0
            with storage.parquet_writer(io.outputs["answers"], ANSWER_SCHEMA) as write:
                for window in storage.iter_windows(teacher, self.cfg.storage.window_rows):
                    got = window.to_pylist()
                    outs = [
                        {
                            "answer": recorded_answer(r["instruction"], r["answer"]),
                            "finish_reason": "stop",
                            "prompt_tokens": 0,
                            "completion_tokens": 1,
                        }
                        for r in got
                    ]
                    write(answers_table(got, outs))
                    rows += len(got)
            return StageResult(rows=rows)

    def timed_repeats(method: str):
        """The stage run ``repeats`` times in place; every sample's seconds are kept."""

        def stage(self, io):
            samples = []
            for _ in range(repeats):
                # the last repeat's output (~170 MB at 1M) is still being written back: each
                # sample starts from clean pages, as the stage's one run in a round does
                os.sync()
                started = time.perf_counter()
                result = getattr(Driver, method)(self, io)
                samples.append(round(time.perf_counter() - started, 3))
            path = out / "samples.json"
            got = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps(got | {method: samples}))
            return result

        return stage

    for method in REPEATED.values():
        setattr(Recorded, method, timed_repeats(method))

    cfg = load_config("demo", settings(out, n, new))
    run(cfg, show_progress=False, console=Console(stderr=True), driver_cls=Recorded)


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(out: Path, n: int, new: int, repeats: int) -> dict:
    """Run one size's round in a child process, sampling its memory; its figures."""
    import psutil

    from lion_ray.engines.cluster import process_tree_rss_mib

    env = {**os.environ, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "bench.scale", "--child", str(n), "--new", str(new)]
    cmd += ["--out", str(out), "--repeats", str(repeats)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    driver_peak = tree_peak = 0.0
    while proc.poll() is None:
        try:
            driver_peak = max(driver_peak, _vm_hwm_mib(proc.pid))
            tree_peak = max(tree_peak, process_tree_rss_mib(proc.pid))
        except (OSError, psutil.Error):  # the driver ended between poll() and the reading
            pass
        time.sleep(0.5)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"size {n}: the run failed (rc {proc.returncode}):\n{err[-4000:]}")
    manifest = json.loads((out / "run" / "manifest.json").read_text())["stages"]
    stage_s = {k.split("/", 1)[1]: round(manifest[k]["seconds"], 2) for k in STAGES}
    rows = {k.split("/", 1)[1]: max(1, manifest[k]["rows"]) for k in STAGES}
    rows["generation"] = n  # its work is the Cache Pool's index and the candidates
    samples = json.loads((out / "samples.json").read_text())
    for stage, method in REPEATED.items():
        stage_s[stage] = round(statistics.median(samples[method]), 3)
    files = [p for p in (out / "run").rglob("*") if p.is_file()]
    return {
        "driver_peak_mib": round(driver_peak, 1),
        "tree_peak_mib": round(tree_peak, 1),
        "stage_s": stage_s,
        "us_per_row": {k: round(stage_s[k] / rows[k] * 1e6, 2) for k in stage_s},
        "samples_s": {stage: samples[method] for stage, method in REPEATED.items()},
        "files": len(files),
        "run_dir_mib": round(sum(p.stat().st_size for p in files) / 2**20, 1),
        "wall_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--live", type=int, default=2000, help="rows the cache does not hold")
    parser.add_argument("--new", type=int, default=600, help="new instructions to generate")
    parser.add_argument("--out", default="/tmp/lion-bench-scale")
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs of each pool stage (the median counts)"
    )
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(Path(args.out), args.child, args.new, args.repeats)
        return
    if args.prepare is not None:
        print(json.dumps(prepare(Path(args.out), args.prepare, args.live)))
        return
    sizes = {}
    for n in (int(x) for x in args.sizes.split(",")):
        out = Path(args.out) / str(n)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        # the world is made in a process of its own: its memory is not the driver's
        made = subprocess.run(
            [sys.executable, "-m", "bench.scale", "--prepare", str(n), "--live", str(args.live)]
            + ["--out", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        prepared = json.loads(made.stdout.strip().splitlines()[-1])
        sizes[str(n)] = measure(out, n, args.new, args.repeats) | {
            "prepare_s": prepared["prepare_s"]
        }
        print(json.dumps({str(n): sizes[str(n)]}), file=sys.stderr, flush=True)
    growth = {}
    if "100000" in sizes and "1000000" in sizes:
        small, big = sizes["100000"], sizes["1000000"]
        growth["driver_peak_1m_over_100k"] = round(
            big["driver_peak_mib"] / small["driver_peak_mib"], 3
        )
        growth["us_per_row_1m_over_100k"] = round(
            max(big["us_per_row"][k] / small["us_per_row"][k] for k in big["us_per_row"]), 3
        )
        growth["stage_ratios"] = {
            k: round(big["us_per_row"][k] / small["us_per_row"][k], 3) for k in big["us_per_row"]
        }
    print(json.dumps({"sizes": sizes, "growth": growth, "live": args.live, "new": args.new}))


if __name__ == "__main__":
    main()
