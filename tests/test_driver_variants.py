"""Runs that differ from the reference mini run: a skipped last round and a referee that
cannot judge, a budget across a SIGKILL, a chat-template LoRA student selecting by
learnability, a run too big for its cluster, a run directory's config, a failed stage."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest

from lion_ray.config import load_config
from lion_ray.errors import LionError
from lion_ray.logic.accounting import cost_usd
from lion_ray.sandbox.server import SandboxProcess, ServerOptions

from .runs import MINI, kill_during, lion_run, lion_status, manifest, redone


@pytest.mark.slow
def test_a_last_round_skips_the_referee_and_a_referee_that_cannot_judge_fails_in_one_line(
    tmp_path, shared_cluster
):
    """By default the last round trains and scores only: its discrimination and generation
    would feed a round that does not come; status and the report say what was skipped and
    why, and no referee or generator call is paid. Asked for them later, the run runs them:
    here against a referee that answers nonsense, so discrimination fails with the model,
    the share and two of its replies on one line (the traceback goes to the run's log),
    and no generator call is made."""
    run_dir = tmp_path / "run"
    nonsense = ("--set", "sandbox.malformed_rate=1.0")
    skip = ("--set", "loop.last_round_generates=false")
    proc = lion_run(run_dir, *nonsense, *skip, cluster=shared_cluster)
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
    assert "Not run: discrimination.referee" in (run_dir / "report" / "index.html").read_text()

    ask = ("--set", "loop.last_round_generates=true")
    proc = lion_run(run_dir, *nonsense, *ask, cluster=shared_cluster)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]
    assert redone(out)[:3] == [
        "round_1/discrimination.teacher",
        "round_1/discrimination.student",
        "round_1/discrimination.referee",
    ]
    assert "error: the referee (sandbox-referee) gave no readable score for 60 of 60 pairs" in out
    assert "Traceback" not in out and "Two of its replies" in out
    status = lion_status(run_dir)
    assert "round_1/discrimination.referee" in status["failures"]
    assert "referee" in status["spend"] and "generator" not in status["spend"]
    log = (run_dir / "logs" / "ray.log").read_text()
    assert "round_1/discrimination.referee failed:" in log and "Traceback" in log


def test_the_last_round_leaves_out_what_only_a_next_round_would_use(tmp_path):
    """The stage graph: a 1-round run's round has no discrimination, generation or next
    pools, and says why; extended to 2 rounds, round 1 has them all and round 2 leaves
    them out instead (the rounds' recorded stages are kept, so only these run)."""
    from lion_ray.driver import Driver
    from lion_ray.rundir import RunDir

    class NoSession:
        run = RunDir(str(tmp_path / "r"))

    def names(rounds: int, r: int, *more: str) -> list[str]:
        cfg = load_config(MINI, [f"loop.rounds={rounds}", *more])
        return [s.name for s in Driver(cfg, NoSession()).round_stages(r, "base")]

    skipping = "loop.last_round_generates=false"
    full = names(1, 1, "loop.last_round_generates=true")
    assert names(1, 1, skipping) == ["imitation.teacher", "imitation.train", "eval.heldout"]
    assert names(2, 1, skipping) == full and "generation" in full and "pools" in full
    assert names(2, 2, skipping) == names(1, 1, skipping)
    skipped = Driver(load_config(MINI, ["loop.rounds=2", skipping]), NoSession()).skipped_stages()
    assert sorted(skipped) == sorted(f"round_2/{n}" for n in full if n not in names(1, 1, skipping))
    assert "extend the run (--set loop.rounds=3)" in next(iter(skipped.values()))


@pytest.mark.slow
def test_a_budget_holds_across_a_sigkill_and_a_raised_cap(tmp_path, shared_cluster):
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
            # the ledger is the point, not the student: no engine starts beside the teacher
            "--set",
            "student.engine=per_stage",
        ]
        first = lion_run(
            run_dir,
            *teacher,
            "--set",
            "teacher.budget_usd=1.0",
            "--set",
            "teacher.requests_per_minute=120",
        )
        kill_during(first, run_dir, "round_1/imitation.teacher", lambda: billed() >= 0.8)
        time.sleep(1)  # whatever was in flight lands at the provider
        assert 0.8 <= billed() <= 1.0
        second = lion_run(
            run_dir, *teacher, "--set", "teacher.budget_usd=2.0", cluster=shared_cluster
        )
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
def test_a_run_that_asks_for_more_than_the_cluster_has_fails_at_once(tmp_path, shared_cluster):
    """Six 2-CPU training workers on a Ray of 8 logical CPUs: refused before any stage runs,
    naming the resource (Ray Train would otherwise retry its worker group forever)."""
    started = time.monotonic()
    proc = lion_run(
        tmp_path / "run",
        *("--set", "train.workers=6", "--set", "train.cpus_per_worker=2"),
        *("--set", "train.effective_batch_size=48"),
        cluster=shared_cluster,
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out[-3000:]
    assert time.monotonic() - started < 120
    assert "6 x {2 CPU} = 12 CPU in all" in out and "Lower train.workers" in out, out[-2000:]
    assert not redone(out)  # nothing ran, nothing was spent


@pytest.mark.slow
def test_two_rounds_with_a_chat_template_student_a_lora_adapter_and_learnability(
    tmp_path, shared_cluster
):
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
        cluster=shared_cluster,
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
