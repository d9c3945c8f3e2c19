"""Does adversarial mining pay? Five ways to spend the same teacher budget, several seeds each.

    python -m bench.hard_mining --quick          # a smoke size: 3 seeds x 5 arms, ~15 minutes
    python -m bench.hard_mining                  # the full size of docs/method.md (~12 h here)
    python -m bench.hard_mining --docs           # and write its table and plot into docs/
    python -m bench.hard_mining --report-only    # summarize the recorded pairs, run nothing
    python -m bench.hard_mining --parallel 2     # two (arm, seed) pairs at once
    python -m bench.hard_mining --first-seed 100 --seeds 1 --arms random   # a validation pilot

The world: the sandbox's ten task families, with the generator that writes like an LLM
(docs/method.md). The full size is the demo (configs/demo.yaml): a seed pool of 1000
difficulty-1 instructions, families drawn by their weights, and a held-out set drawn the
same way (``sandbox.heldout_distribution=seed``) from a seed the seed pool never uses.

Arms, each adding the same number of teacher-answered training instructions per round
(``loop.hard_per_round + loop.easy_per_round``; the Train Pool accumulates, as in the demo):

  referee       the paper's: both-order referee, hard when teacher - student >= tau
  student_loss  the student's loss on the teacher's answer, the hardest half hard
  learnability  that loss times the fraction it fell since the last round, the top half hard
  random        parents drawn from the whole Cache Pool, same hard/easy generation calls
  one_shot      fresh instructions from the seed distribution, no feedback (Alpaca-style)

Round 1 (setup, teacher answers, training, held-out score) is the same for every arm of a
seed, so it runs once and each arm continues from a copy of it (the stage graph skips what
is recorded with the same inputs). The last round trains and scores only, as every run's
does: its discrimination and generation would feed a round that never runs. No setting was tuned on
the held-out set: every value below was fixed, and written in docs/method.md, before the
first reported run; seeds from 100 up are validation seeds, never reported.

Each finished (arm, seed) writes its result to a small JSON file (the full size:
``docs/method_run2/ARM-seedN.json``, under version control; other sizes: under --out), and
each seed's shared round 1 writes ``shared-seedN.json``; every file names the commit it ran
on. A pair with a file is never run again, so the run goes on in parts, on any machine, and
the tables are built from the files alone. A pair that was interrupted has no file and is
run again from its run directory (or from scratch on a new machine). Pairs run in the order
that answers the main question first: seeds in order, and within a seed ``referee``,
``learnability``, ``random``, then ``student_loss`` and ``one_shot``. With --parallel N,
N processes take pairs from that order, each claiming a pair with a lock file (a process
that dies lets go of its claims); every process has its own local Ray.

Prints one JSON line: per arm the final held-out accuracy (mean and 95% t-interval over
seeds), per pair the mean paired difference and its interval, plus accuracy by round, by
family and by difficulty, what each arm added (by family and difficulty), and what
discrimination cost. Writes ``accuracy.png`` and ``table.md`` under --out (and docs/ with
--docs). Interrupted runs resume where they stopped (run it again with the same --out).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from rich.console import Console

from lion_ray import storage
from lion_ray.config import dump_config, load_config
from lion_ray.driver import Driver, Stage, StageIO, StageResult, run
from lion_ray.logic.pools import import_records
from lion_ray.rundir import RunDir
from lion_ray.sandbox.tasks import parse_instruction
from lion_ray.session import Session

ARMS = ("referee", "student_loss", "learnability", "random", "one_shot")
# the order pairs run in: after three seeds of the first three arms, the paired intervals
# for learnability-referee and referee-random exist
RUN_ORDER = ("referee", "learnability", "random", "student_loss", "one_shot")
REPO = Path(__file__).resolve().parent.parent
RUN2_RECORDS = REPO / "docs" / "method_run2"  # the registered run's results, one per pair
SHARED = ("imitation.teacher", "imitation.train", "eval.heldout")  # round 1, every arm
SIZES = {
    # a smoke size: every arm, stage and statistic runs; the student learns too little here
    # for its numbers to say anything about the method (most of each seed's minutes are
    # fixed stage start-up: Ray Train worker groups, Ray Data pipelines, engine swaps)
    "quick": {
        "seeds": 3,
        "rounds": 2,
        "overrides": [
            "sandbox.seed_tasks=150",
            "sandbox.heldout_tasks=100",
            "loop.hard_per_round=60",
            "loop.easy_per_round=30",
            "train.epochs=3",
        ],
    },
    # the size of docs/method.md: the demo itself (configs/demo.yaml: 1000 seed instructions,
    # 400 hard-rule + 200 easy-rule new ones per round, 12 epochs, 300 held-out), for five
    # rounds: a pilot on validation seed 100 reached 0.48 in four, and arms need room to
    # differ. About 2.4 hours per seed on 2 cores (training dominates); it resumes
    "full": {
        "seeds": 5,
        "rounds": 5,
        "overrides": [],
    },
}
COMMON = [
    "sandbox.max_difficulty=1",
    "sandbox.heldout_distribution=seed",
    "loop.pool_policy=accumulate",
    "loop.hard_fraction=0.5",
    "train.workers=1",  # two cores: one worker trains as fast, without the gloo all-reduce
    "serve.during_run=false",  # nobody chats with these students: no HTTP proxy
]
# two-sided 95% quantiles of Student's t by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


class OneShot(Driver):
    """The Alpaca-style arm: each round adds fresh instructions drawn like the seed pool,
    with no discrimination and no generator."""

    def discrimination_stages(
        self, cache_pool, model, judged, teacher_cache, student_cache, judged_before=None
    ):
        return [
            Stage(
                "discrimination.random", self.unlabelled, {"pool": cache_pool}, {"judged": judged}
            )
        ]

    def generation(self, io: StageIO) -> StageResult:
        from lion_ray.sandbox.tasks import generate_tasks

        loop, sb = self.cfg.loop, self.cfg.sandbox
        seen = set(storage.read_parquet(io.inputs["cache_pool"]).column("instruction").to_pylist())
        n = loop.hard_per_round + loop.easy_per_round
        drawn = generate_tasks(
            len(seen) + 3 * n, seed=sb.task_seed + 7919 * io.round, max_difficulty=sb.max_difficulty
        )
        fresh = [t for t in drawn if t.instruction not in seen][:n]
        new, _ = import_records(
            [(t.as_record(), f"one_shot:{io.round}:{i}") for i, t in enumerate(fresh)],
            source="one_shot",
            round_no=io.round,
            kind="one_shot",
        )
        storage.write_parquet(io.outputs["new"], new)
        storage.write_parquet(io.outputs["candidates"], new)
        return StageResult(rows=new.num_rows, metrics={"new_instructions": new.num_rows})


def arm_config(size: dict, seed: int, arm: str, run_dir: Path, rounds: int):
    return load_config(
        "demo",
        COMMON
        + size["overrides"]
        + [
            f"loop.rounds={rounds}",
            f"loop.selection={'random' if arm == 'one_shot' else arm}",
            f"loop.seed={seed}",
            f"sandbox.task_seed={seed}",
            f"storage.run_dir={run_dir}",
            f"name=hard-mining-{arm}-seed{seed}",
        ],
    )


def shared_round_one(
    size: dict, seed: int, out: Path, console: Console, rounds: int, engine
) -> Path:
    """Setup and round 1's imitation and held-out score, once per seed."""
    base = out / f"seed{seed}" / "round1"
    cfg = arm_config(size, seed, "random", base, rounds)
    with Session(cfg, show_progress=False, quiet=True, student_engine=engine) as session:
        driver = Driver(cfg, session, console, show_progress=False)
        driver.check_config()
        driver.run_stages(None, driver.setup_stages())
        stages = driver.round_stages(1, driver.run.path("student_init"))
        driver.run_stages(1, [s for s in stages if s.name in SHARED])
    return base


def fork(base: Path, cfg, run_dir: Path) -> None:
    """A copy of round 1 that continues as ``cfg`` (an arm) would have."""
    if (run_dir / "manifest.json").exists():
        return  # resuming this arm
    shutil.copytree(base, run_dir)
    storage.write_text(str(run_dir / "config.yaml"), dump_config(cfg))


def arm_results(run_dir: Path, rounds: int) -> dict:
    stages = RunDir(str(run_dir)).manifest.stages
    heldout = [stages[f"round_{r}/eval.heldout"].metrics for r in range(1, rounds + 1)]
    disc = [rec for key, rec in stages.items() if "/discrimination." in key]
    return {
        "accuracy_by_round": [h["accuracy"] for h in heldout],
        "by_family": heldout[-1]["by_family"],
        "by_difficulty": heldout[-1]["by_difficulty"],
        "discrimination_requests": sum(a.requests for rec in disc for a in rec.api.values()),
        "discrimination_usd": round(sum(rec.cost_usd for rec in disc), 4),
        "new_instructions": sum(
            stages[f"round_{r}/generation"].metrics.get("new_instructions", 0)
            for r in range(1, rounds)
        ),
        **added_mix(run_dir, rounds),
    }


def added_mix(run_dir: Path, rounds: int) -> dict:
    """What an arm added to the Train Pool after round 1: shares by family and difficulty
    (the sandbox reads each instruction back into its task)."""
    families: Counter = Counter()
    difficulties: Counter = Counter()
    for r in range(1, rounds):
        new = storage.read_parquet(str(run_dir / f"round_{r}" / "generation" / "new.parquet"))
        for text in new.column("instruction").to_pylist():
            task = parse_instruction(text)
            families[task.family if task else "unparsed"] += 1
            difficulties[str(task.difficulty) if task else "unparsed"] += 1
    total = max(1, sum(families.values()))
    return {
        "added_by_family": {k: v / total for k, v in sorted(families.items())},
        "added_by_difficulty": {k: v / total for k, v in sorted(difficulties.items())},
    }


def interval(xs: list[float]) -> tuple[float, list[float]]:
    """Mean and two-sided 95% t-interval (a single value has an interval of itself)."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, [mean, mean]
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = T95.get(n - 1, 1.96) * sd / math.sqrt(n)
    return mean, [mean - half, mean + half]


def summarize(results: dict[str, dict[int, dict]], rounds: int) -> dict:
    arms, differences = {}, {}
    for arm, by_seed in results.items():
        finals = [r["accuracy_by_round"][-1] for r in by_seed.values()]
        mean, ci = interval(finals)
        by_round = [
            interval([r["accuracy_by_round"][k] for r in by_seed.values()]) for k in range(rounds)
        ]
        families = sorted(next(iter(by_seed.values()))["by_family"])
        difficulties = sorted(next(iter(by_seed.values()))["by_difficulty"])
        arms[arm] = {
            "seeds": len(finals),
            "accuracy_mean": round(mean, 4),
            "accuracy_ci95": [round(x, 4) for x in ci],
            "accuracy_by_round": [
                {"mean": round(m, 4), "ci95": [round(x, 4) for x in c]} for m, c in by_round
            ],
            "by_family": {
                f: round(sum(r["by_family"][f] for r in by_seed.values()) / len(finals), 4)
                for f in families
            },
            "by_difficulty": {
                d: round(sum(r["by_difficulty"][d] for r in by_seed.values()) / len(finals), 4)
                for d in difficulties
            },
            "added_by_family": _mean_shares([r["added_by_family"] for r in by_seed.values()]),
            "added_by_difficulty": _mean_shares(
                [r["added_by_difficulty"] for r in by_seed.values()]
            ),
            "discrimination_requests_per_seed": round(
                sum(r["discrimination_requests"] for r in by_seed.values()) / len(finals), 1
            ),
            "discrimination_usd_per_seed": round(
                sum(r["discrimination_usd"] for r in by_seed.values()) / len(finals), 4
            ),
        }
    for a, b in itertools.combinations(results, 2):
        seeds = sorted(set(results[a]) & set(results[b]))
        if not seeds:  # a run in parts: these two arms share no finished seed yet
            continue
        diffs = [
            results[a][s]["accuracy_by_round"][-1] - results[b][s]["accuracy_by_round"][-1]
            for s in seeds
        ]
        mean, ci = interval(diffs)
        differences[f"{a}-{b}"] = {
            "mean": round(mean, 4),
            "ci95": [round(x, 4) for x in ci],
            "seeds": len(diffs),
        }
    return {"arms": arms, "differences": differences}


def _mean_shares(shares: list[dict]) -> dict:
    keys = sorted({k for d in shares for k in d})
    return {k: round(sum(d.get(k, 0.0) for d in shares) / len(shares), 3) for k in keys}


def plot(summary: dict, rounds: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = list(range(1, rounds + 1))
    for arm, data in summary["arms"].items():
        means = [r["mean"] for r in data["accuracy_by_round"]]
        ax.plot(xs, means, marker="o", label=arm)
        ax.fill_between(
            xs,
            [r["ci95"][0] for r in data["accuracy_by_round"]],
            [r["ci95"][1] for r in data["accuracy_by_round"]],
            alpha=0.15,
        )
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.set_xticks(xs)
    ax.legend()
    ax.set_title("mean over seeds, 95% t-interval")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _per_arm(arms: dict, title: str, key: str, digits: int) -> list[str]:
    """A markdown table: one row per value of ``arms[*][key]``, one column per arm."""
    rows = sorted({k for a in arms.values() for k in a[key]})
    lines = ["", f"| {title} | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for k in rows:
        cells = " | ".join(f"{arms[a][key].get(k, 0.0):.{digits}f}" for a in arms)
        lines.append(f"| {k} | {cells} |")
    return lines


def table(summary: dict) -> str:
    arms = summary["arms"]
    lines = [
        "| arm | seeds | final accuracy | 95% interval | referee/API requests per seed | $ per seed |",
        "|---|---|---|---|---|---|",
    ]
    for arm, d in arms.items():
        lo, hi = d["accuracy_ci95"]
        lines.append(
            f"| {arm} | {d['seeds']} | {d['accuracy_mean']:.3f} | [{lo:.3f}, {hi:.3f}] | "
            f"{d['discrimination_requests_per_seed']:.0f} | {d['discrimination_usd_per_seed']:.4f} |"
        )
    lines += ["", "| difference (paired by seed) | mean | 95% interval |", "|---|---|---|"]
    for pair, d in summary["differences"].items():
        lines.append(f"| {pair} | {d['mean']:+.3f} | [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] |")
    lines += _per_arm(arms, "final accuracy by family", "by_family", 3)
    lines += _per_arm(arms, "share of added instructions, by family", "added_by_family", 2)
    lines += _per_arm(arms, "share of added instructions, by difficulty", "added_by_difficulty", 2)
    lines += _per_arm(arms, "final accuracy by difficulty", "by_difficulty", 3)
    return "\n".join(lines) + "\n"


def code_commit() -> str:
    """The commit this checkout runs, with '+dirty' when its tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("+dirty" if dirty else "")


def record_path(records: Path, arm: str, seed: int) -> Path:
    return records / f"{arm}-seed{seed}.json"


def write_record(path: Path, record: dict) -> None:
    """Atomically: a file that exists is a finished pair (a kill mid-write leaves none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_record(path: Path, size: str, rounds: int) -> dict:
    """A finished pair's result; one of another size or round count is not mixed in."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(
            f"{path}: not a readable result ({exc}); delete it to run the pair again"
        ) from None
    if (record.get("size"), record.get("rounds")) != (size, rounds):
        raise SystemExit(
            f"{path}: recorded for size {record.get('size')!r} with {record.get('rounds')} "
            f"rounds, this run is {size!r} with {rounds}; use another --records folder"
        )
    return record


def api_totals(run_dir: Path) -> dict:
    """Every API request and dollar of one arm's run (round 1's shared teacher included)."""
    by_role: dict[str, dict] = {}
    for rec in RunDir(str(run_dir)).manifest.stages.values():
        for role, use in rec.api.items():
            cur = by_role.setdefault(role, {"requests": 0, "usd": 0.0})
            cur["requests"] += use.requests
            cur["usd"] = round(cur["usd"] + use.cost_usd, 6)
    return {
        "api_requests": sum(r["requests"] for r in by_role.values()),
        "api_usd": round(sum(r["usd"] for r in by_role.values()), 4),
        "api_by_role": by_role,
    }


@contextlib.contextmanager
def claim(path: Path, wait: bool):
    """An exclusive lock on ``path`` (yields False when ``wait`` is off and another process
    holds it). The kernel drops it when its process dies, so no claim outlives its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_pairs(args, name: str, size: dict, pairs, out: Path, records: Path, rounds: int):
    """Run every pair of ``pairs`` that has no record and no other process's claim."""
    console = Console(stderr=True)
    commit = code_commit()
    engine = None
    try:
        for seed, arm in pairs:
            final = record_path(records, arm, seed)
            with claim(out / "claims" / final.with_suffix(".lock").name, wait=False) as mine:
                if not mine or final.exists():
                    continue
                if engine is None:
                    engine = start_engine(size, seed, arm, out, rounds)
                started = time.monotonic()
                with claim(out / "claims" / f"shared-seed{seed}.lock", wait=True):
                    base = shared_round_one(size, seed, out, console, rounds, engine)
                    record_shared(records, name, seed, rounds, base, commit, started)
                run_dir = out / f"seed{seed}" / arm
                cfg = arm_config(size, seed, arm, run_dir, rounds)
                fork(base, cfg, run_dir)
                run(
                    cfg,
                    show_progress=False,
                    console=console,
                    driver_cls=OneShot if arm == "one_shot" else Driver,
                    student_engine=engine,
                )
                result = arm_results(run_dir, rounds) | api_totals(run_dir)
                write_record(
                    final,
                    result
                    | {
                        "arm": arm,
                        "seed": seed,
                        "size": name,
                        "rounds": rounds,
                        "commit": commit,
                        # this pair alone, its share of the shared round 1 included when it ran
                        "wall_s": round(time.monotonic() - started, 1),
                        "parallel": args.parallel,
                        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    },
                )
                console.print(f"seed {seed} {arm}: {json.dumps(result['accuracy_by_round'])}")
    finally:
        if engine is not None:
            engine.stop()


def record_shared(records, name, seed, rounds, base, commit, started) -> None:
    """Round 1 of a seed, the same for every arm: recorded once; a rerun of it on another
    machine or commit is checked against the record (the arms' numbers build on it)."""
    path = records / f"shared-seed{seed}.json"
    stage = RunDir(str(base)).manifest.stages["round_1/eval.heldout"]
    accuracy = stage.metrics["accuracy"]
    if path.exists():
        recorded = read_record(path, name, rounds)
        if recorded["accuracy_round1"] != accuracy:
            Console(stderr=True).print(
                f"[yellow]seed {seed}: round 1 scored {accuracy} here, {path} recorded "
                f"{recorded['accuracy_round1']} (commit {recorded['commit']}): the arms "
                "that follow build on this machine's round 1[/yellow]"
            )
        return
    write_record(
        path,
        {
            "seed": seed,
            "size": name,
            "rounds": rounds,
            "commit": commit,
            "accuracy_round1": accuracy,
            "by_family_round1": stage.metrics["by_family"],
            "wall_s": round(time.monotonic() - started, 1),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def start_engine(size: dict, seed: int, arm: str, out: Path, rounds: int):
    """One Ray, one Serve and one student engine for every run of this process, as for every
    stage of one run: each run moves its own student into the engine (a start is about
    10 s, and there are six runs per seed)."""
    from lion_ray.engines.cluster import init_ray
    from lion_ray.engines.serving import start_serve
    from lion_ray.engines.student_engine import StudentEngine
    from lion_ray.student import init_student

    first = arm_config(size, seed, arm, out, rounds)
    init_ray(first.cluster, quiet=True)
    start_serve(proxy_location="Disabled")
    engine_init = out / f"engine_init-{os.getpid()}"  # processes of --parallel: one each
    init_student(str(engine_init), first.student.tiny)
    return StudentEngine.start(
        first.student,
        str(engine_init),
        first.serve,
        train=first.train,
        app="hard-mining-student",
        http=False,
    )


def main() -> None:
    # parse
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the ~15-minute smoke size")
    parser.add_argument("--seeds", type=int, default=None, help="override the size's seeds")
    parser.add_argument(
        "--rounds", type=int, default=None, help="override the size's rounds (a pilot's)"
    )
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds run from here: 0 for the reported runs, 100+ for validation (pilots)",
    )
    parser.add_argument(
        "--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}"
    )
    parser.add_argument(
        "--out", default=None, help="default: /tmp/lion-bench-hard-mining-SIZE[-seedFIRST]"
    )
    parser.add_argument(
        "--records",
        default=None,
        help="where each finished (arm, seed) writes its result file; default: "
        "docs/method_run2 for the full size's reported seeds, else OUT/records",
    )
    parser.add_argument(
        "--parallel", type=int, default=1, help="processes taking pairs at once (each its Ray)"
    )
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    parser.add_argument(
        "--docs", action="store_true", help="also write docs/method_[quick_]{table.md,accuracy.png}"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: summarize the recorded pairs",
    )
    # a process that --parallel started: it takes pairs, and neither starts others nor reports
    parser.add_argument("--helper", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    name = "quick" if args.quick else "full"
    size = SIZES[name]
    seeds = list(range(args.first_seed, args.first_seed + (args.seeds or size["seeds"])))
    arms = [a for a in args.arms.split(",") if a]
    if unknown := set(arms) - set(ARMS):
        parser.error(f"--arms: unknown {sorted(unknown)}; choose from {','.join(ARMS)}")
    if args.parallel < 1:
        parser.error("--parallel: at least 1")
    rounds = args.rounds or size["rounds"]
    if args.docs and args.first_seed >= 100:
        parser.error("--docs: seeds from 100 up are validation seeds, never reported")
    pilot = f"-seed{args.first_seed}" if args.first_seed else ""  # never mixed with reported runs
    out = Path(args.out or f"/tmp/lion-bench-hard-mining-{name}{pilot}")
    reported = name == "full" and args.first_seed < 100 and args.rounds in (None, size["rounds"])
    records = (
        Path(args.records) if args.records else (RUN2_RECORDS if reported else out / "records")
    )
    if args.fresh and not args.report_only:
        shutil.rmtree(out, ignore_errors=True)
        if records != RUN2_RECORDS:  # the registered run's files are removed by hand only
            shutil.rmtree(records, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    order = [a for a in RUN_ORDER if a in arms]
    pairs = [(seed, arm) for seed in seeds for arm in order]

    # run: round 1 once per seed, then every arm from a copy of it; pairs already recorded
    # are skipped, so an interrupted run goes on where it stopped
    if not args.report_only:
        helpers = []
        for _ in range(0 if args.helper else args.parallel - 1):
            argv = [a for a in sys.argv[1:] if a != "--fresh"]
            helpers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench.hard_mining", *argv, "--helper"], cwd=REPO
                )
            )
            time.sleep(30)  # Ray starts one at a time: two at once on 2 cores time out
        run_pairs(args, name, size, pairs, out, records, rounds)
        for helper in helpers:
            if helper.wait() != 0:
                raise SystemExit(f"a --parallel process failed (rc {helper.returncode})")
    if args.helper:
        return

    # report: from the recorded pairs alone
    results: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    for seed, arm in pairs:
        if record_path(records, arm, seed).exists():
            results[arm][seed] = read_record(record_path(records, arm, seed), name, rounds)
    results = {arm: by_seed for arm, by_seed in results.items() if by_seed}
    if not results:
        raise SystemExit(f"no recorded pair under {records}: nothing to report")
    summary = summarize(results, rounds)
    plot(summary, rounds, out / "accuracy.png")
    (out / "table.md").write_text(table(summary))
    if args.docs:
        docs = REPO / "docs"
        prefix = "method_quick_" if name == "quick" else "method_"  # quick never overwrites full
        shutil.copy(out / "accuracy.png", docs / f"{prefix}accuracy.png")
        (docs / f"{prefix}table.md").write_text(table(summary))
    print(
        json.dumps(
            summary
            | {"size": name, "rounds": rounds, "wall_s": round(time.monotonic() - started, 1)}
        )
    )


if __name__ == "__main__":
    main()
