"""The Lion distillation loop as a Ray job.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/distill.py --config configs/demo.yaml [--set loop.rounds=1]

Runs inside the cluster (RAY_ADDRESS is set by the job supervisor, so the driver joins
the cluster instead of starting a local one). Resubmitting the same command resumes a run
that was interrupted: completed stages are skipped.
"""

from __future__ import annotations

import argparse
import sys

from lion_ray.config import load_config
from lion_ray.driver import run
from lion_ray.errors import LionError
from lion_ray.progress import make_console


def main(argv: list[str] | None = None) -> int:
    # parse
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="run config (YAML), relative to the working dir"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="override, e.g. loop.rounds=1"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="Ray's own messages in the job log too"
    )
    args = parser.parse_args(argv)
    console = make_console()
    try:
        cfg = load_config(args.config, args.overrides)
        # init, build and run: the driver connects to the cluster and walks the rounds
        run(cfg, show_progress=False, console=console, verbose=args.verbose)
    except LionError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        return 1
    # clean up happens in the driver's session (sandbox stopped, Ray left running for the cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
