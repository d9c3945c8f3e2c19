"""Deploy the student behind the OpenAI-compatible Ray Serve endpoint, as a Ray job.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/serve.py --run s3://bucket/lion-runs/lion-7b [--config configs/paper.yaml]

The Serve application outlives this job (Serve apps are detached); resubmitting with another
--model or a newer run is a hot swap of the running replicas. On KubeRay, prefer the
RayService in cluster/kuberay/, which declares the same application.
"""

from __future__ import annotations

import argparse
import sys

from lion_ray.config import load_config
from lion_ray.engines.cluster import init_ray
from lion_ray.engines.serving import deploy
from lion_ray.errors import LionError
from lion_ray.progress import make_console


def main(argv: list[str] | None = None) -> int:
    # parse
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory: serve its newest round and follow new ones")
    source.add_argument("--model", help="an exported student (Hugging Face format)")
    parser.add_argument("--config", help="run config (serve section, prompt template)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="override, e.g. serve.port=8000",
    )
    args = parser.parse_args(argv)
    console = make_console()
    try:
        cfg = load_config(args.config, args.overrides)
        # init: join the cluster the job runs on
        init_ray(cfg.cluster, quiet=True)
        # build and run (a run directory serves with the prompt format it trained with)
        url = deploy(cfg.serve, student=cfg.student, model_dir=args.model, run_dir=args.run)
    except LionError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        return 1
    console.print(f"student served at {url} (OpenAI API under /v1, chat page at /)")
    if not cfg.serve.api_keys_env:
        console.print("warning: serving WITHOUT authentication (set serve.api_keys_env)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
