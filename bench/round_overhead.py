"""Round overhead: one student engine for the run against engines started by every stage.

    python -m bench.round_overhead [--rounds 2] [--config demo]

Runs `lion-ray run` on the demo config twice, from empty run directories, one after the
other: `student.engine=per_stage` (each inference stage starts a Ray Data pool and loads
the student, each API call starts its workers) and `student.engine=resident` (one Serve
deployment for the run, reached by every stage, each round's weights moved into it; API
workers that live for the run). Each stage records its wall time, the
time an engine computed (training loop, inference, dedup) and the time some API request
was in flight; overhead is the rest (start-ups, loading, I/O), training's own included.
`per_stage` is the behaviour before resident engines: every stage also starts (and stops)
its endpoint's API workers. The last line is JSON:

    {"per_stage_s", "resident_s", "speedup", "overhead_share_per_stage",
     "overhead_share_resident", "heldout_per_stage", "heldout_resident", ...}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_arm(engine: str, rounds: int, config: str, run_dir: Path) -> dict:
    """One `lion-ray run` with ``student.engine=engine``: its wall time and its stages."""
    cmd = [
        sys.executable,
        "-m",
        "lion_ray",
        "run",
        "--config",
        config,
        "--no-progress",
        *("--set", f"loop.rounds={rounds}"),
        *("--set", f"student.engine={engine}"),
        *("--set", f"storage.run_dir={run_dir}"),
    ]
    started = time.monotonic()
    res = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""}
    )
    wall = time.monotonic() - started
    if res.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    return {"wall_s": wall, "stages": stages}


def summarize(arm: dict, rounds: int) -> dict:
    stages = arm["stages"].values()
    seconds = sum(s["seconds"] for s in stages)
    compute = sum(s.get("compute_s") or 0.0 for s in stages)
    api = sum(s.get("api_wait_s") or 0.0 for s in stages)
    overhead = sum(
        max(0.0, s["seconds"] - (s.get("compute_s") or 0.0) - s.get("api_wait_s", 0.0))
        for s in stages
    )
    by_stage: dict[str, float] = {}
    compute_by_stage: dict[str, float] = {}
    for key, s in arm["stages"].items():
        name = key.rpartition("/")[2]
        spent = max(0.0, s["seconds"] - (s.get("compute_s") or 0.0) - s.get("api_wait_s", 0.0))
        by_stage[name] = round(by_stage.get(name, 0.0) + spent, 1)
        compute_by_stage[key] = s.get("compute_s")
    heldout = [
        arm["stages"][f"round_{r}/eval.heldout"]["metrics"]["accuracy"]
        for r in range(1, rounds + 1)
    ]
    return {
        "wall_s": round(arm["wall_s"], 1),
        "stage_s": round(seconds, 1),
        "compute_s": round(compute, 1),
        "api_wait_s": round(api, 1),
        "overhead_s": round(overhead, 1),
        "overhead_share": round(overhead / seconds, 3) if seconds else 0.0,
        "overhead_by_stage": by_stage,
        "compute_by_stage": compute_by_stage,
        "heldout": heldout,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--config", default="demo")
    args = parser.parse_args()

    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lion-overhead-") as tmp:
        for engine in ("per_stage", "resident"):
            arm = run_arm(engine, args.rounds, args.config, Path(tmp) / engine)
            out[engine] = summarize(arm, args.rounds)
            print(f"{engine}: {json.dumps(out[engine])}", flush=True)
    per_stage, resident = out["per_stage"], out["resident"]
    print(
        json.dumps(
            {
                "per_stage_s": per_stage["wall_s"],
                "resident_s": resident["wall_s"],
                "speedup": round(per_stage["wall_s"] / resident["wall_s"], 2),
                "overhead_share_per_stage": per_stage["overhead_share"],
                "overhead_share_resident": resident["overhead_share"],
                "heldout_per_stage": per_stage["heldout"],
                "heldout_resident": resident["heldout"],
                "rounds": args.rounds,
                "config": args.config,
            }
        )
    )


if __name__ == "__main__":
    main()
