"""The whole loop as users run it: `lion-ray run`, SIGKILL anywhere and rerun, `ray job submit`."""

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

from lion_ray.config import load_config
from lion_ray.errors import LionError

from .conftest import DATA, ROOT

MINI = DATA / "mini.yaml"
ENV = {**os.environ, "RAY_ADDRESS": ""}


def lion_run(run_dir: Path, *extra: str, **kw) -> subprocess.Popen:
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
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


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


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted mini run: the baseline the resumed runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    proc = lion_run(run_dir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return run_dir, out


@pytest.mark.slow
def test_run_records_every_stage_and_updates_pools(reference_run):
    run_dir, out = reference_run
    stages = manifest(run_dir)["stages"]
    for key in [
        "setup.student",
        "round_1/pools.seed",
        "setup.heldout",
        "round_1/imitation.teacher",
        "round_1/imitation.train",
        "round_1/discrimination.teacher",
        "round_1/discrimination.student",
        "round_1/discrimination.referee",
        "round_1/eval.heldout",
        "round_1/generation",
        "round_1/pools",
    ]:
        assert key in stages, key
    # pool accounting (paper policy): next Train Pool = the new instructions, Cache Pool grows
    new = pq.read_table(run_dir / "round_1" / "generation" / "new.parquet").column("id").to_pylist()
    gen = stages["round_1/generation"]["metrics"]
    assert (
        gen["hard"]["accepted"] == 20 and gen["easy"]["accepted"] + gen["easy"]["shortfall"] == 10
    )
    assert pool_ids(run_dir, 2, "train") == new and len(new) == gen["new_instructions"]
    assert pool_ids(run_dir, 2, "cache") == pool_ids(run_dir, 1, "cache") + new
    assert (
        stages["round_1/discrimination.teacher"]["api"]["teacher"]["cached"] == 60
    )  # answered in imitation
    # the report: JSON, HTML and the plots
    report = run_dir / "round_1" / "report"
    for name in [
        "report.json",
        "index.html",
        "pools.png",
        "scores.png",
        "split.png",
        "cost.png",
        "time.png",
        "heldout.png",
    ]:
        assert (report / name).stat().st_size > 0, name
    data = json.loads((report / "report.json").read_text())
    assert data["summary"][0]["train"] == 60 and data["rounds"][0]["heldout"]["n"] == 30
    assert "Ray dashboard: http" in out and "report:" in out and "round 1 done" in out
    # off a terminal (ray job logs, CI) the round table is wide enough for every column
    header = next(line for line in out.splitlines() if line.strip().startswith("round   train"))
    assert "held-out" in header and header.split()[-2:] == ["$", "s"], header


@pytest.mark.slow
def test_status_and_a_rerun_that_skips_everything(reference_run):
    run_dir, _ = reference_run
    status = subprocess.run(
        [sys.executable, "-m", "lion_ray", "status", "--run", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**ENV, "COLUMNS": "200"},
    )
    assert status.returncode == 0
    for word in ["imitation.train", "discrimination.referee", "generation", "API tokens", "hard"]:
        assert word in status.stdout
    before = manifest(run_dir)["stages"]
    proc = lion_run(run_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "> round_1/" not in out  # nothing was redone
    assert manifest(run_dir)["stages"] == before


def _kill_during(proc: subprocess.Popen, run_dir: Path, stage: str, ready) -> None:
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


@pytest.mark.slow
def test_sigkill_in_any_stage_then_rerun_gives_the_same_pools(reference_run, tmp_path):
    reference, _ = reference_run
    run_dir = tmp_path / "killed"
    r1 = run_dir / "round_1"
    # API stages get a low rate limit for the attempt that is killed, so that a fast machine
    # cannot finish them between two polls (a resumed run may change operational fields).
    kills = [
        (
            "round_1/imitation.teacher",
            lambda: any((run_dir / "cache" / "teacher").glob("*.jsonl")),
            ["--set", "teacher.requests_per_minute=120"],
        ),  # API stage
        (
            "round_1/imitation.train",
            lambda: any((r1 / "imitation" / "train").glob("checkpoint_*")),
            [],
        ),  # training
        ("round_1/discrimination.student", lambda: True, []),  # inference
        (
            "round_1/generation",
            lambda: any((run_dir / "cache" / "generator").glob("*.jsonl")),
            ["--set", "generator.requests_per_minute=60"],
        ),  # generation
    ]
    for stage, ready, slow in kills:
        _kill_during(lion_run(run_dir, *slow), run_dir, stage, ready)
    final = lion_run(run_dir)
    out, _ = final.communicate(timeout=600)
    assert final.returncode == 0, out[-3000:]
    train_info = manifest(run_dir)["stages"]["round_1/imitation.train"]["metrics"]
    assert train_info["resumed_from_step"]  # training picked up its checkpoint
    for which in ("train", "cache"):
        assert pool_ids(run_dir, 2, which) == pool_ids(reference, 2, which)


def test_a_run_dir_keeps_its_config(tmp_path):
    from lion_ray.driver import Driver
    from lion_ray.storage import RunDir

    class FakeSession:
        run = RunDir(str(tmp_path / "r"))

    cfg = load_config(MINI)
    Driver(cfg, FakeSession()).check_config()
    Driver(
        cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"num_cpus": 4})}),
        FakeSession(),
    ).check_config()  # where Ray runs may change between attempts
    Driver(
        load_config(
            MINI,
            ["generator.requests_per_minute=60", "teacher.budget_usd=5", "storage.run_dir=/moved"],
        ),
        FakeSession(),
    ).check_config()  # and so may how fast and how far the API stages go, and where it lives
    changed = load_config(MINI, ["train.lr=0.1", "loop.tau=2"])
    with pytest.raises(
        LionError, match=r"different config \(loop.tau: 1.0 -> 2.0, train.lr: 0.003 -> 0.1\)"
    ):
        Driver(changed, FakeSession()).check_config()
