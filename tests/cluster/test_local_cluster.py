"""A real local cluster: `ray start` head + worker via cluster/local/, then `ray job submit`."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from ..conftest import DATA, ROOT
from ..helpers import BIN, LocalCluster, free_port, http_json


@pytest.mark.slow
def test_ray_job_submit_on_a_head_and_a_worker(tmp_path):
    """The loop as a job on two nodes, then the student served from it with keys that only the
    head node's environment holds (as with a Kubernetes secret on the head pod)."""
    run_dir = tmp_path / "run"
    keys = {"LION_SERVE_KEYS": "user-key-1", "LION_ADMIN_KEYS": "admin-key-1"}
    with LocalCluster(head_env=keys) as cluster:
        cluster.env["RAY_ADDRESS"] = f"127.0.0.1:{cluster.port}"
        nodes = cluster.node_ids()
        assert len(nodes) == 2
        # Two jobs, each of two programs (`sh -c "A && B"`: B runs only if A passed), since
        # every `ray job submit` starts a supervisor and unpacks a runtime env: on 2 cores,
        # tens of seconds a job. First the embedded sandbox, which binds the node's address
        # and every node reaches; then the loop on both nodes.
        mini = ["--config", str(DATA / "mini.yaml")]
        reach = ["python", "tests/cluster/reach_sandbox.py", *mini]
        distill = ["python", "jobs/distill.py", *mini, "--set", f"storage.run_dir={run_dir}"]
        distill += ["--set", "train.placement=STRICT_SPREAD"]
        job = cluster.submit(
            "sh", "-c", f"{shlex.join(reach)} && {shlex.join(distill)}", timeout=900
        )
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-2000:]
        assert "succeeded" in job.stdout + job.stderr
        shown = [ln for ln in job.stdout.splitlines() if ln.startswith("Ray dashboard: http")]
        assert shown and shown[0].endswith(f":{cluster.dashboard}"), job.stdout[-3000:]
        reached = [ln for ln in job.stdout.splitlines() if ln.startswith('{"host"')]
        assert len(reached) == 1, job.stdout[-3000:]
        seen = json.loads(reached[0])
        assert seen["host"] != "127.0.0.1" and set(seen["nodes"]) == nodes
        assert {r["node"] for r in seen["replies"]} == nodes
        assert len({r["answer"] for r in seen["replies"]}) == 1 and seen["replies"][0]["answer"]
        # The trained student goes behind Serve by a second job; the app outlives the job.
        # Asked first for keys from a variable nobody set, serve.py fails closed (`!`: the job
        # goes on only if it failed) and says which variable; then with the head's keys.
        port = free_port()
        serve = ["python", "jobs/serve.py", "--run", str(run_dir), "--set", f"serve.port={port}"]
        missing = [*serve, "--set", "serve.api_keys_env=LION_KEYS_NOBODY_SET"]
        keyed = [*serve, "--set", "serve.api_keys_env=LION_SERVE_KEYS"]
        keyed += ["--set", "serve.admin_keys_env=LION_ADMIN_KEYS", "--set", "serve.num_replicas=2"]
        served = cluster.submit(
            "sh", "-c", f"! {shlex.join(missing)} && {shlex.join(keyed)}", timeout=600
        )
        assert served.returncode == 0, served.stdout[-3000:] + served.stderr[-2000:]
        assert "$LION_KEYS_NOBODY_SET, but it is not set" in served.stdout + served.stderr
        import openai
        from openai import OpenAI

        url = f"http://127.0.0.1:{port}"
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0).models.list()
        client = OpenAI(base_url=f"{url}/v1", api_key="user-key-1", max_retries=3)
        assert client.models.list().data[0].root.endswith("round_1/imitation/model")
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Reverse 'kato'."}], max_tokens=8
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens >= 1
        # both replicas check keys, the one on the worker node (no variable there) too
        replica_nodes: set[str] = set()
        for _ in range(40):
            status, body = http_json(f"{url}/v1/admin/status", "admin-key-1")
            assert status == 200
            replica_nodes.add(body["node_id"])
            if replica_nodes == nodes:
                break
        assert replica_nodes == nodes
        assert http_json(f"{url}/v1/admin/status", "user-key-1")[0] == 403
        outside = {"model_dir": str(tmp_path)}  # an admin key, a path outside the run
        assert http_json(f"{url}/v1/admin/reload", "admin-key-1", outside)[0] == 403
        newest = {"model_dir": str(run_dir / "round_1" / "imitation" / "model")}
        assert http_json(f"{url}/v1/admin/reload", "admin-key-1", newest)[0] == 200
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["finished_rounds"] == 1
    workers = manifest["stages"]["round_1/imitation.train"]["metrics"]["worker_nodes"]
    assert set(workers) == nodes  # work ran on both nodes, one training worker each
    assert (run_dir / "round_2" / "pools" / "cache.parquet").exists()


@pytest.mark.slow
def test_the_paper_run_on_a_cluster_whose_gpu_group_starts_at_zero_asks_the_autoscaler(
    tmp_path, tiny_student
):
    """The shipped cluster's shape with its GPU group at 0 pods (a CPU head of 8): the
    paper's run is not refused, since cluster.node_types says 8 GPU pods may come; it asks
    the autoscaler for its largest step at the start, and its training stage waits for the
    GPUs, then stops at the deadline saying what it waited for. (Here no autoscaler adds
    them: a plain `ray start` head records the request where Ray's autoscaler reads it.)"""
    key = {"OPENAI_API_KEY": "sk-unused-by-the-sandbox"}  # the head pod's secret
    with LocalCluster(workers=0, cpus=8, head_env=key) as cluster:
        address = f"127.0.0.1:{cluster.port}"
        sets = [
            f"cluster.address={address}",
            "cluster.autoscale_timeout_s=5",
            f"storage.run_dir={tmp_path / 'run'}",
            "loop.seed_pool=sandbox",
            "sandbox.seed_tasks=16",
            "sandbox.heldout_tasks=0",
            "teacher.base_url=sandbox",
            "referee.base_url=sandbox",
            "generator.base_url=sandbox",
            f"student.model_path={tiny_student}",
            "student.backend=hf",  # vLLM is not in this environment; the same GPU shares
            "student.gpus_per_engine=1",
        ]
        run = subprocess.run(
            [str(BIN / "lion-ray"), "run", "--config", "paper"]
            + [arg for s in sets for arg in ("--set", s)],
            cwd=ROOT,
            env={**cluster.env, **key},
            capture_output=True,
            text=True,
            timeout=600,
        )
        out = run.stdout + run.stderr
        assert run.returncode == 1, out[-4000:]
        assert (
            "asked the autoscaler for imitation.train: Ray Train workers: 8 x {7 CPU, 0.49" in out
        )
        assert "waited 5 s for the autoscaler to add nodes for imitation.train" in out, out[-4000:]
        assert "Traceback" not in run.stderr  # one line of cause, not Ray's traceback
        code = (
            f"import ray, json; ray.init(address='{address}');"
            "from ray.experimental.internal_kv import _internal_kv_get;"
            "print(_internal_kv_get(b'autoscaler_resource_request').decode())"
        )
        asked = json.loads(cluster.sh(sys.executable, "-c", code).stdout.strip().splitlines()[-1])
    gpus = sum(b.get("GPU", 0) for b in asked)
    assert gpus == pytest.approx(8.0)  # 8 workers of a whole GPU (round 1) asked last
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["round_1/imitation.teacher"]["rows"] == 16  # stages before went on
    assert "round_1/imitation.train" not in manifest["stages"]
