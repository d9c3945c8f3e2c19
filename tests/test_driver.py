"""The whole loop as users run it: `lion-ray run`, SIGKILL anywhere and rerun, `ray job submit`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lion_ray.config import load_config
from lion_ray.errors import LionError
from lion_ray.logic.accounting import cost_usd
from lion_ray.sandbox.server import SandboxProcess, ServerOptions

from .conftest import DATA, ROOT
from .helpers import SLOW_CHECKPOINTS, lion_cli, registered_checkpoints

MINI = DATA / "mini.yaml"
# the run's console as under `ray job submit` or CI: no terminal and no COLUMNS (a test
# runner's worker may have one set)
ENV = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"RAY_ADDRESS": ""}


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
    referee = stages["round_1/discrimination.referee"]["api"]["referee"]
    assert data["summary"][0]["select"] == "referee"
    assert data["summary"][0]["disc req"] == referee["requests"] >= 120  # both orders
    assert lion_status(run_dir)["discrimination"]["1"]["requests"] == referee["requests"]
    assert "Ray dashboard: http" in out and "report:" in out and "round 1 done" in out
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
def test_the_last_round_pays_for_no_referee_or_generator_until_the_run_is_extended(tmp_path):
    """By default the last round trains and scores only: its discrimination and generation
    would feed a round that does not come. Status and the report say what was skipped and
    why; extended by a round, the run runs them then, and skips the new last round's."""
    run_dir = tmp_path / "run"
    proc = lion_run(run_dir, "--set", "loop.last_round_generates=false")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert redone(out) == [
        "setup.student",
        "round_1/pools.seed",
        "setup.heldout",
        "round_1/imitation.teacher",
        "round_1/imitation.train",
        "round_1/eval.heldout",
    ]
    status = lion_status(run_dir)
    assert sorted(status["skipped"]) == [
        "round_1/discrimination.referee",
        "round_1/discrimination.student",
        "round_1/discrimination.teacher",
        "round_1/generation",
        "round_1/pools",
    ]
    assert "--set loop.rounds=2" in status["skipped"]["round_1/generation"]
    assert set(status["spend"]) == {"teacher"}  # the ledger: no referee or generator call
    page = (run_dir / "report" / "index.html").read_text()
    assert "Not run: discrimination.referee" in page
    proc = lion_run(run_dir, "--set", "loop.rounds=2", "--set", "loop.last_round_generates=false")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert redone(out)[:5] == [
        "round_1/discrimination.teacher",
        "round_1/discrimination.student",
        "round_1/discrimination.referee",
        "round_1/generation",
        "round_1/pools",
    ]
    status = lion_status(run_dir)
    assert {"referee", "generator"} <= set(status["spend"])
    assert all(k.startswith("round_2/") for k in status["skipped"]) and status["skipped"]


@pytest.mark.slow
def test_a_referee_that_never_gives_a_readable_score_fails_the_round_in_one_line(tmp_path):
    """A server whose referee answers nonsense: discrimination fails with the referee's
    model, the share and two of its replies, on one line (the traceback goes to the run's
    log); the run stops there, so no generator call is paid for."""
    run_dir = tmp_path / "run"
    proc = lion_run(run_dir, "--set", "sandbox.malformed_rate=1.0")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]
    assert "error: the referee (sandbox-referee) gave no readable score for 60 of 60 pairs" in out
    assert "Traceback" not in out and "Two of its replies" in out
    status = lion_status(run_dir)
    assert "round_1/discrimination.referee" in status["failures"]
    assert "generator" not in status["spend"]
    log = (run_dir / "logs" / "ray.log").read_text()
    assert "round_1/discrimination.referee failed:" in log and "Traceback" in log


@pytest.mark.slow
def test_a_deleted_output_redoes_its_stage_and_what_read_it(reference_run, tmp_path):
    reference, _ = reference_run
    run_dir = tmp_path / "moved"
    shutil.copytree(reference, run_dir)  # a moved run directory resumes where it was
    (run_dir / "round_1" / "discrimination" / "judged.parquet").unlink()
    proc = lion_run(run_dir)
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
def test_a_run_written_by_lion_ray_0_1_resumes(reference_run, tmp_path):
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
    proc = lion_run(run_dir)
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
def test_a_budget_holds_across_a_sigkill_and_a_raised_cap(tmp_path):
    """SIGKILL a paid teacher stage when its budget is nearly spent, rerun with a raised cap:
    what the provider billed over both attempts stays under the raised cap, and
    `lion-ray status` reports what it billed."""
    run_dir = tmp_path / "budget"
    price_in, price_out = 1.0, 0.1  # $ per 1K tokens: about $0.045 per teacher call
    with SandboxProcess(ServerOptions(latency_ms=20)) as provider:  # outlives both attempts

        def billed() -> float:
            st = provider.stats()
            return cost_usd(st["prompt_tokens"], st["completion_tokens"], price_in, price_out)

        teacher = [
            "--set",
            f"teacher.base_url={provider.base_url}",
            "--set",
            f"teacher.price_per_1k_input={price_in}",
            "--set",
            f"teacher.price_per_1k_output={price_out}",
            "--set",
            "teacher.max_tokens=8",
        ]
        first = lion_run(
            run_dir,
            *teacher,
            "--set",
            "teacher.budget_usd=1.0",
            "--set",
            "teacher.requests_per_minute=120",
        )
        _kill_during(first, run_dir, "round_1/imitation.teacher", lambda: billed() >= 0.8)
        time.sleep(1)  # whatever was in flight lands at the provider
        assert 0.8 <= billed() <= 1.0
        second = lion_run(run_dir, *teacher, "--set", "teacher.budget_usd=2.0")
        out, _ = second.communicate(timeout=300)
        assert second.returncode == 1 and "budget_usd $2.0 reached" in out, out[-3000:]
        # the 60-row stage needs about $2.7: without the first attempt's spend counted, the
        # rerun would have paid for all of it
        total = billed()
        assert 1.8 <= total <= 2.0, total
        assert provider.stats()["served"] < 60
        reported = lion_status(run_dir)["spend"]["teacher"]
        # never less than was billed (fail closed); more only by the worst case of a request
        # the kill caught in flight before the provider saw it (a busy machine, about $0.045)
        assert -0.01 < reported["spent_usd"] - total <= 0.1, (reported, total)
        assert "round_1/imitation.teacher" not in manifest(run_dir)["stages"]


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
            lambda: registered_checkpoints(r1 / "imitation" / "train") > 0,
            list(SLOW_CHECKPOINTS),
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


@pytest.mark.slow
def test_a_driver_killed_while_weights_move_resumes_serving_the_right_round(
    reference_run, ray_local, tmp_path
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
    _kill_during(lion_run(run_dir, *two), run_dir, "round_2/discrimination.student", lambda: True)
    rerun = lion_run(run_dir, *two)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-3000:]
    assert redone(out)[0] == "round_2/discrimination.student"
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


def test_a_run_dir_keeps_its_config(tmp_path):
    from lion_ray.driver import Driver
    from lion_ray.rundir import RunDir

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
    more = ["loop.rounds=5", "generator.requests_per_minute=7"]
    Driver(load_config(MINI, more), FakeSession()).check_config()
    recorded = load_config(FakeSession.run.path("config.yaml"))
    assert recorded.loop.rounds == 5  # a finished run goes on for more rounds
    assert recorded.generator.requests_per_minute == cfg.generator.requests_per_minute != 7

    class TargetSession:
        run = RunDir(str(tmp_path / "target"))

    target = ["sandbox.heldout_distribution=target"]
    Driver(load_config(MINI, target), TargetSession()).check_config()
    with pytest.raises(LionError, match=r"loop.rounds: 1 -> 5"):  # its held-out set spans them
        Driver(load_config(MINI, [*target, "loop.rounds=5"]), TargetSession()).check_config()
    changed = load_config(MINI, ["train.lr=0.1", "loop.tau=2"])
    with pytest.raises(
        LionError, match=r"different config \(loop.tau: 1.0 -> 2.0, train.lr: 0.003 -> 0.1\)"
    ):
        Driver(changed, FakeSession()).check_config()


def test_a_failed_stage_is_recorded_shown_and_retried(tmp_path):
    """A stage that raises keeps its error in the manifest (status shows it) and is not
    recorded done, so the rerun does it again; once it completes, the failure is gone."""
    from lion_ray.driver import Driver, Stage, StageResult
    from lion_ray.rundir import RunDir
    from lion_ray.status import status_table

    class FakeSession:
        run = RunDir(str(tmp_path / "r"))

        def bill_to(self, stage):
            pass

        def quiet_logs(self):
            pass

        def take_api_wait_s(self):
            return 0.0

    driver = Driver(load_config(MINI), FakeSession())
    driver.engines_started = True  # no Ray or sandbox: the stage is a plain function
    attempts = []

    def flaky(io):
        attempts.append(io.key)
        if len(attempts) < 3:
            raise RuntimeError(f"engine died (attempt {len(attempts)})")
        (tmp_path / "r" / "out.txt").write_text("done")
        return StageResult(rows=1)

    stage = Stage("discrimination.student", flaky, {}, {"out": str(tmp_path / "r" / "out.txt")})
    for attempt in (1, 2):
        with pytest.raises(RuntimeError):
            driver.run_stage("round_1/discrimination.student", 1, stage)
        failure = RunDir(str(tmp_path / "r")).manifest.data.failures[
            "round_1/discrimination.student"
        ]
        assert failure.attempts == attempt and f"engine died (attempt {attempt})" in failure.error
    table, data = status_table(str(tmp_path / "r"))
    assert "FAILED round_1/discrimination.student (attempt 2" in table.caption
    assert data["failures"]["round_1/discrimination.student"]["error"].startswith("RuntimeError")
    driver.run_stage("round_1/discrimination.student", 1, stage)
    manifest = RunDir(str(tmp_path / "r")).manifest.data
    assert not manifest.failures and "round_1/discrimination.student" in manifest.stages


@pytest.mark.slow
def test_a_run_that_asks_for_more_than_the_cluster_has_fails_at_once(tmp_path):
    """Six 2-CPU training workers on a local Ray of 8 logical CPUs: refused before any stage
    runs, naming the resource (Ray Train would otherwise retry its worker group forever)."""
    started = time.monotonic()
    proc = lion_run(
        tmp_path / "run",
        *("--set", "train.workers=6", "--set", "train.cpus_per_worker=2"),
        *("--set", "train.effective_batch_size=48", "--set", "cluster.num_cpus=8"),
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out[-3000:]
    assert time.monotonic() - started < 120
    assert "6 x {2 CPU} = 12 CPU in all" in out and "Lower train.workers" in out, out[-2000:]
    assert not redone(out)  # nothing ran, nothing was spent


@pytest.mark.slow
def test_two_rounds_with_a_chat_template_student_a_lora_adapter_and_learnability(tmp_path):
    """The loop with a Qwen2-style chat student trained through LoRA, selecting by what the
    student can still learn: each round exports an adapter, which the loss and held-out stages
    load on its base, and discrimination asks the referee nothing. Round 1 has no earlier
    losses, so it selects by loss alone (selection 'student_loss'); round 2 weighs each loss
    by how far it fell since round 1."""
    run_dir = tmp_path / "chat"
    proc = lion_run(
        run_dir,
        *("--set", "student.prompt_format=chat", "--set", "student.system_prompt=Be brief."),
        *("--set", "student.tiny.architecture=qwen2", "--set", "student.tiny.chat_template=chatml"),
        *(
            "--set",
            "train.lora.r=8",
            "--set",
            "train.lora.export=adapter",
            "--set",
            "train.lr=0.01",
        ),
        *("--set", "loop.selection=learnability", "--set", "loop.hard_fraction=0.25"),
        *("--set", "loop.rounds=2"),
    )
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    model = run_dir / "round_1" / "imitation" / "model"
    assert (model / "adapter_config.json").exists() and not (model / "model.safetensors").exists()
    assert (
        json.loads((model / "lion_ray_base.json").read_text())["relative"]
        == "../../../student_init"
    )
    stages = manifest(run_dir)["stages"]
    train = stages["round_1/imitation.train"]["metrics"]
    assert train["trainable_parameters"] < train["parameters"] / 5
    assert stages["round_1/eval.heldout"]["metrics"]["n"] == 30
    # selection by loss: no student answers, no referee, a quarter of the pool hard
    assert "round_1/discrimination.referee" not in stages
    assert "round_1/discrimination.student" not in stages
    split = stages["round_1/discrimination.learnability"]["metrics"]
    assert split["judged"] == 60 and split["hard"] == 15 and split["failed"] == 0
    assert split["mean_hard_loss"] > split["mean_easy_loss"] > 0
    assert split["with_previous_loss"] == 0
    judged = pq.read_table(run_dir / "round_1" / "discrimination" / "judged.parquet").to_pylist()
    by_loss = sorted(judged, key=lambda r: (-r["student_loss"], r["id"]))
    assert {r["id"] for r in judged if r["label"] == "hard"} == {r["id"] for r in by_loss[:15]}
    assert all(r["referee_calls"] == 0 for r in judged)
    # round 2: the instructions of round 1's Cache Pool carry their round-1 loss
    before = {r["id"]: r["student_loss"] for r in judged}
    judged_2 = pq.read_table(run_dir / "round_2" / "discrimination" / "judged.parquet")
    rows_2 = [r for r in judged_2.to_pylist() if r["status"] == "ok"]
    split_2 = stages["round_2/discrimination.learnability"]["metrics"]
    assert split_2["with_previous_loss"] == len([r for r in rows_2 if r["id"] in before]) >= 55
    for r in rows_2:
        if r["id"] in before:
            fell = min(1.0, max(0.0, (before[r["id"]] - r["student_loss"]) / before[r["id"]]))
            assert r["learnability"] == pytest.approx(r["student_loss"] * fell)
    hard_2 = [r for r in rows_2 if r["label"] == "hard"]
    assert len(hard_2) == round(len(rows_2) * 0.25)
    assert min(r["learnability"] for r in hard_2) >= max(
        r["learnability"] for r in rows_2 if r["label"] == "easy"
    )
    status = lion_status(run_dir)
    assert status["spend"].get("referee", {"spent_usd": 0.0})["spent_usd"] == 0.0
    assert status["discrimination"]["2"]["selection"] == "learnability"
    assert status["discrimination"]["1"]["cost_usd"] == 0.0  # the teacher's answers: cached
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert [row["select"] for row in report["summary"]] == ["learnability"] * 2
    assert report["summary"][0]["disc $"] == 0.0 and report["summary"][0]["hard"] == 0.25
    gen = stages["round_1/generation"]["metrics"]
    assert gen["new_instructions"] > 0
    teacher = pq.read_table(run_dir / "round_1" / "imitation" / "teacher.parquet")
    assert set(teacher.column("status").to_pylist()) == {"ok"}
