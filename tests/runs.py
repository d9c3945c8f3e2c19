"""`lion-ray run` of the mini config as the driver tests run it, and what they read back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .conftest import DATA, ROOT
from .helpers import lion_cli

MINI = DATA / "mini.yaml"


def _off_terminal(env) -> dict:
    """``env`` without COLUMNS: the run's console as under `ray job submit` or CI (a test
    runner's worker may have one set)."""
    return {k: v for k, v in env.items() if k != "COLUMNS"}


ENV = _off_terminal(os.environ) | {"RAY_ADDRESS": ""}


def lion_run(run_dir: Path, *extra: str, cluster=None, **kw) -> subprocess.Popen:
    """`lion-ray run` of the mini config into ``run_dir``: on a Ray of its own, or on the
    worker's ``shared_cluster`` where the test is not about starting Ray or killing a run."""
    on = ("--set", f"cluster.address={cluster.address}") if cluster is not None else ()
    cmd = [
        sys.executable,
        "-m",
        "lion_ray",
        "run",
        "--config",
        str(MINI),
        "--no-progress",
        "--set",
        f"storage.run_dir={run_dir}",
        *on,
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        # the shared cluster's environment (its PATH, Ray's auth) goes off the terminal too
        env=ENV | _off_terminal(cluster.env if cluster is not None else {}) | {"RAY_ADDRESS": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def lion_status(run_dir: Path) -> dict:
    """`lion-ray status --json`, as a user runs it."""
    status = lion_cli("status", "--run", str(run_dir), "--json", env=ENV)
    assert status.returncode == 0, status.stderr
    return json.loads(status.stdout)


def redone(out: str) -> list[str]:
    """The stages a run (re)did, from its '> key' lines."""
    return [line.split()[1] for line in out.splitlines() if line.startswith("> ")]


def manifest(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return {"stages": {}}


def pool_ids(run_dir: Path, round_no: int, which: str) -> list[str]:
    return (
        pq.read_table(run_dir / f"round_{round_no}" / "pools" / f"{which}.parquet")
        .column("id")
        .to_pylist()
    )


def kill_during(proc: subprocess.Popen, run_dir: Path, stage: str, ready) -> None:
    """SIGKILL the driver (and the Ray it started) once ``stage`` runs and ``ready()`` holds."""
    deadline = time.time() + 400
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before reaching {stage}: {proc.stdout.read()[-2000:]}")
        if manifest(run_dir).get("current_stage") == stage and ready():
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert stage not in manifest(run_dir)["stages"], f"{stage} finished before the kill"
