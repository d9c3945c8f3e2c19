"""The whole loop as users run it, against one reference mini run: every stage recorded,
a rerun that skips everything, a deleted output, a 0.1 run directory, SIGKILL in training and
rerun, a driver killed while weights move. (tests/test_driver_variants.py: runs that differ
from the reference.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from .conftest import ROOT
from .helpers import SLOW_CHECKPOINTS, registered_checkpoints
from .runs import ENV, kill_during, lion_run, lion_status, manifest, pool_ids, redone


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, shared_cluster):
    """One uninterrupted mini run: the baseline the resumed runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    proc = lion_run(run_dir, cluster=shared_cluster)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + shared_cluster.driver_log(proc.pid)
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
    referee = stages["round_1/discrimination.referee"]["api"]["referee"]
    assert data["summary"][0]["select"] == "referee"
    assert data["summary"][0]["disc req"] == referee["requests"] >= 120  # both orders
    assert lion_status(run_dir)["discrimination"]["1"]["requests"] == referee["requests"]
    # the worker's shared cluster has no dashboard, so no URL is printed (the job-submit test
    # sees one on a cluster that has it)
    assert "Ray dashboard" not in out and "report:" in out and "round 1 done" in out
    # one student engine for the run: started once, serving users too, reached by the stages
    assert out.count("student endpoint: http://127.0.0.1:") == 1
    for key in ("discrimination.student", "eval.heldout"):
        assert stages[f"round_1/{key}"]["metrics"]["served_model"] == "round_1/imitation/model"
        assert stages[f"round_1/{key}"]["metrics"]["engine"] == "resident"
    # a console a person can read: Ray's own notices are in the run's log file
    assert "(raylet)" not in out and " serve " not in out and "ray.data" not in out, out[-3000:]
    assert (run_dir / "logs" / "ray.log").stat().st_size > 0
    # where the time went, per stage
    train = stages["round_1/imitation.train"]
    assert 0 < train["compute_s"] <= train["seconds"]
    assert stages["round_1/imitation.teacher"]["api_wait_s"] > 0
    timing = data["rounds"][0]["timing"]["imitation.train"]
    assert timing["overhead_s"] == pytest.approx(
        timing["seconds"] - timing["compute_s"] - timing["api_wait_s"], abs=0.2
    )
    assert "time went" in (report / "index.html").read_text()
    assert data["summary"][0]["loss"] == round(data["summary"][0]["loss"], 4)
    # off a terminal (ray job logs, CI) the round table is wide enough for every column
    header = next(line for line in out.splitlines() if line.strip().startswith("round   train"))
    assert "held-out" in header and header.split()[-2:] == ["$", "s"], header
    # what generation kept and why it rejected the rest: console, status, report
    status = lion_status(run_dir)["generation"]["1"]
    assert status["candidates"] == status["accepted"] + sum(status["rejected"].values())
    assert status["accepted"] == gen["new_instructions"]
    assert sum(f["candidates"] for f in status["by_family"].values()) == status["candidates"]
    line = f"generation: {status['accepted']} of {status['candidates']} candidates accepted"
    assert line in out
    cands = pq.read_table(run_dir / "round_1" / "generation" / "candidates.parquet").to_pylist()
    for reason, n in status["rejected"].items():
        assert n == sum(c["reason"] == reason for c in cands)
    shown = data["rounds"][0]["generation"]["examples"]
    assert set(shown) == set(status["rejected"])  # an example of every reason there was
    assert "what was kept, and why the rest was not" in (report / "index.html").read_text()


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
    assert proc.returncode == 0, out[-3000:]
    assert redone(out) == []  # nothing was redone
    assert "Ray dashboard" not in out and "student endpoint" not in out  # nor started
    assert "round 1 done" in out and manifest(run_dir)["stages"] == before


@pytest.mark.slow
def test_a_deleted_output_redoes_its_stage_and_what_read_it(
    reference_run, shared_cluster, tmp_path
):
    reference, _ = reference_run
    run_dir = tmp_path / "moved"
    shutil.copytree(reference, run_dir)  # a moved run directory resumes where it was
    (run_dir / "round_1" / "discrimination" / "judged.parquet").unlink()
    proc = lion_run(run_dir, cluster=shared_cluster)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert redone(out) == [
        "round_1/discrimination.referee",
        "round_1/generation",
        "round_1/pools",
    ]
    stages = manifest(run_dir)["stages"]
    referee = stages["round_1/discrimination.referee"]["api"]["referee"]
    assert referee["requests"] == 0 and referee["cached"] == referee["rows"]  # paid once, ever
    for which in ("train", "cache"):
        assert pool_ids(run_dir, 2, which) == pool_ids(reference, 2, which)


@pytest.mark.slow
def test_a_run_written_by_lion_ray_0_1_resumes(reference_run, shared_cluster, tmp_path):
    """0.1.0 wrote a version 1 manifest (free-form dicts, no fingerprints) and no ledger."""
    reference, _ = reference_run
    run_dir = tmp_path / "legacy"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "spend")
    data = manifest(run_dir)
    legacy = {}
    for key, rec in data["stages"].items():
        metrics = dict(rec["metrics"])
        extras = {k: metrics.pop(k) for k in ("sizes", "next", "import") if k in metrics}
        legacy[key] = {
            "completed_at": rec["completed_at"],
            "rows": rec["rows"],
            "failed": rec["failed"],
            "api": rec["api"],
            "metrics": metrics,
            "seconds": rec["seconds"],
            **extras,
        }
    (run_dir / "manifest.json").write_text(
        json.dumps({"version": 1, "stages": legacy, "finished_rounds": 1})
    )
    proc = lion_run(run_dir, cluster=shared_cluster)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and redone(out) == [], out[-3000:]
    adopted = manifest(run_dir)
    assert adopted["version"] == 2
    assert all(rec["inputs"] is not None for rec in adopted["stages"].values())
    status = lion_status(run_dir)
    # what 0.1.0 spent is read from its cache and records until a ledger takes over
    cached = sum(
        json.loads(line)["cost_usd"]
        for shard in (run_dir / "cache" / "teacher").glob("*.jsonl")
        for line in shard.read_text().splitlines()
    )
    recorded = sum(rec["api"].get("teacher", {}).get("cost_usd", 0) for rec in legacy.values())
    spent = status["spend"]["teacher"]["spent_usd"]
    assert spent == round(max(cached, recorded), 6) > 0


@pytest.mark.slow
def test_sigkill_in_training_then_rerun_gives_the_same_pools(
    reference_run, shared_cluster, tmp_path
):
    """SIGKILL the driver (and the Ray it started) while training keeps checkpoints; the
    rerun resumes training from its checkpoint and ends with the reference run's pools.
    Killed API stages are covered where they keep their partial work: test_api's mid-stage
    kill (the response cache), the budget test (a paid teacher stage killed in a run), the
    streaming test (a stage killed at 100K rows); a killed inference or generation stage is
    simply redone."""
    reference, _ = reference_run
    run_dir = tmp_path / "killed"
    r1 = run_dir / "round_1"
    kill_during(
        lion_run(run_dir, *SLOW_CHECKPOINTS),
        run_dir,
        "round_1/imitation.train",
        lambda: registered_checkpoints(r1 / "imitation" / "train") > 0,
    )
    final = lion_run(run_dir, cluster=shared_cluster)  # the kill needs a Ray of its own, not this
    out, _ = final.communicate(timeout=600)
    assert final.returncode == 0, out[-3000:]
    assert redone(out)[0] == "round_1/imitation.train", out[-3000:]
    train_info = manifest(run_dir)["stages"]["round_1/imitation.train"]["metrics"]
    assert train_info["resumed_from_step"]  # training picked up its checkpoint
    for which in ("train", "cache"):
        assert pool_ids(run_dir, 2, which) == pool_ids(reference, 2, which)


@pytest.mark.slow
def test_a_driver_killed_while_weights_move_resumes_serving_the_right_round(
    reference_run, ray_local, shared_cluster, tmp_path
):
    """SIGKILL the driver as round 2's weights move into the engine; the rerun starts the
    engine on round 2's student (answers as that student does) and finishes the round.
    Round 1 is the reference run's, extended to two rounds (as a user extends a finished
    run), so only round 2 is trained here."""
    from lion_ray.config import StudentConfig
    from lion_ray.engines.inference import student_answers

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run[0], run_dir)
    two = ("--set", "loop.rounds=2")
    kill_during(lion_run(run_dir, *two), run_dir, "round_2/discrimination.student", lambda: True)
    rerun = lion_run(run_dir, *two, cluster=shared_cluster)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-3000:]
    assert redone(out)[0] == "round_2/discrimination.student", out[-3000:]
    stages = manifest(run_dir)["stages"]
    first = manifest(reference_run[0])["stages"]["round_1/imitation.train"]
    assert stages["round_1/imitation.train"] == first  # round 1 was not trained again
    served = stages["round_2/discrimination.student"]["metrics"]
    assert served["served_model"] == "round_2/imitation/model"
    answered = pq.read_table(run_dir / "round_2" / "discrimination" / "student.parquet")
    pool = pq.read_table(run_dir / "round_2" / "pools" / "cache.parquet")
    expected, _ = student_answers(
        pool,
        StudentConfig(prompt_format="compact", max_new_tokens=12),
        model_uri=str(run_dir / "round_2" / "imitation" / "model"),
        show_progress=False,
    )
    assert answered.column("answer").to_pylist() == expected.column("answer").to_pylist()
