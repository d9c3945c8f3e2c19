"""Submitted as a Ray job by the cluster test: start a Session (which starts the embedded
sandbox) and call it from a task pinned to each node; prints one JSON line.

    ray job submit --working-dir . -- python tests/cluster/reach_sandbox.py --config tests/data/mini.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from urllib.parse import urlparse


def ask(base_url: str) -> dict:
    import ray
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="sandbox", max_retries=2, timeout=30)
    reply = client.chat.completions.create(
        model="sandbox-teacher", messages=[{"role": "user", "content": "Reverse 'kato'."}]
    )
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "answer": reply.choices[0].message.content,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from lion_ray.config import load_config
    from lion_ray.session import Session

    cfg = load_config(args.config)
    with Session(cfg, quiet=True, show_progress=False) as session:
        base_url = session.endpoint("teacher").base_url
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        remote_ask = ray.remote(num_cpus=0)(ask)
        replies = ray.get(
            [
                remote_ask.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
                ).remote(base_url)
                for node in nodes
            ]
        )
    print(json.dumps({"host": urlparse(base_url).hostname, "nodes": nodes, "replies": replies}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
