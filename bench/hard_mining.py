"""Does the method's core idea hold on the sandbox? Lion's hard/easy mining against new
instructions derived from randomly chosen Cache Pool instructions, with equal budgets.

    python -m bench.hard_mining [--rounds 3] [--scale demo|small] [--fresh]

Two complete runs of the loop from the same seed pool, student and seeds, differing only in
``loop.parent_selection``: 'lion' (hard-rule instructions from the instructions the referee
found hard, easy-rule ones from the easy ones) or 'random' (parents drawn from the whole
judged Cache Pool, the same number of hard-rule and easy-rule calls). The last line is JSON
with the held-out sandbox accuracy after the final round of each.

--scale demo (the default) is configs/demo.yaml as `make demo` runs it (about 10 minutes per
arm on 2 cores); --scale small is a weaker student on fewer instructions (about 8 minutes
per arm), whose hard ratio stays above 80%, so that nearly every parent is hard in both arms.
Each arm is an ordinary run directory under --out, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import shutil

from rich.console import Console

from lion_ray.config import load_config
from lion_ray.driver import run

SCALES = {
    "demo": [],
    "small": [
        "sandbox.seed_tasks=400",
        "sandbox.heldout_tasks=300",
        "loop.hard_per_round=300",
        "loop.easy_per_round=100",
        "train.epochs=8",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", choices=sorted(SCALES), default="demo")
    parser.add_argument("--out", default=None, help="default: /tmp/lion-bench-hard-mining-SCALE")
    parser.add_argument(
        "--fresh", action="store_true", help="start over instead of resuming both runs"
    )
    args = parser.parse_args()
    args.out = args.out or f"/tmp/lion-bench-hard-mining-{args.scale}"
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    console = Console(stderr=True)
    results = {}
    for arm in ("lion", "random"):
        cfg = load_config(
            "configs/demo.yaml",
            SCALES[args.scale]
            + [
                f"loop.rounds={args.rounds}",
                f"loop.parent_selection={arm}",
                f"storage.run_dir={args.out}/{arm}",
                f"name=hard-mining-{arm}",
            ],
        )
        summaries = run(cfg, show_progress=False, console=console)
        results[arm] = {
            "heldout_by_round": [s["held-out"] for s in summaries],
            "hard_ratio_by_round": [s["hard"] for s in summaries],
            "train_pool_by_round": [s["train"] for s in summaries],
        }
        console.print(f"{arm}: {json.dumps(results[arm])}")
    print(
        json.dumps(
            {
                "rounds": args.rounds,
                "scale": args.scale,
                "lion_accuracy": results["lion"]["heldout_by_round"][-1],
                "random_accuracy": results["random"]["heldout_by_round"][-1],
                "lion": results["lion"],
                "random": results["random"],
            }
        )
    )


if __name__ == "__main__":
    main()
