"""Batch mode against the sandbox's Batch API (files + batches) over real HTTP."""

import json
import os
import signal
import subprocess
import time

import pytest

from lion_ray.engines import ledger
from lion_ray.engines.api import BudgetExceeded
from lion_ray.logic import prompts
from lion_ray.logic.accounting import cost_usd
from lion_ray.logic.chat import ChatRequest
from lion_ray.sandbox.server import SandboxProcess, ServerOptions
from lion_ray.sandbox.tasks import generate_tasks

from ..conftest import ROOT, sandbox_engine
from ..helpers import answer_command

PRICE = {"price_per_1k_input": 1.0, "price_per_1k_output": 1.0}


def _requests(n, seed=0):
    tasks = generate_tasks(n, seed=seed)
    return [
        ChatRequest(f"r{i}", prompts.teacher_messages(t.instruction)) for i, t in enumerate(tasks)
    ], tasks


def batch_engine(sb, run_dir, **overrides):
    fields = {"mode": "batch", "batch_poll_s": 0.1, **PRICE} | overrides
    return sandbox_engine(sb, run_dir, **fields)


def test_batch_answers_like_online_at_the_batch_price(ray_local, tmp_path):
    reqs, tasks = _requests(40, seed=1)
    with SandboxProcess(ServerOptions(batch_delay_s=0.3, batch_fail_rate=0.2, fault_seed=3)) as sb:
        engine = batch_engine(sb, tmp_path / "batch")
        results = engine.ask(reqs)
        assert [r.text for r in results] == [t.answer for t in tasks]  # no row lost
        assert [r.request_id for r in results] == [r.request_id for r in reqs]
        stats = sb.stats()["batch"]
        # the lines that failed were sent once more, in a second batch, and no line twice
        assert stats["failed_lines"] > 0 and stats["batches_created"] == 2
        assert engine.batch_stats == {"batches": 2, "resubmitted": stats["failed_lines"]}
        assert stats["lines"] == 40 + stats["failed_lines"]
        assert stats["lines_resubmitted_after_success"] == 0
        batch_cost = sum(r.cost_usd for r in results)
        assert batch_cost == pytest.approx(
            0.5 * cost_usd(stats["prompt_tokens"], stats["completion_tokens"], 1.0, 1.0)
        )
        assert ledger.load(engine.ledger_dir).spent_usd == pytest.approx(batch_cost)
        online = sandbox_engine(sb, tmp_path / "online", **PRICE).ask(reqs)
        assert [r.text for r in online] == [r.text for r in results]
        assert batch_cost / sum(r.cost_usd for r in online) == pytest.approx(0.5)
        # the answers are in the same response cache as online ones: a rerun pays nothing
        again = batch_engine(sb, tmp_path / "batch").ask(reqs)
        assert all(r.cached for r in again) and sb.stats()["batch"]["batches_created"] == 2


def test_batches_are_split_by_the_providers_limits(ray_local, tmp_path):
    reqs, _ = _requests(30, seed=2)
    with SandboxProcess(ServerOptions(batch_delay_s=0.2)) as sb:
        batch_engine(sb, tmp_path / "a", batch_max_requests=7).ask(reqs)
        assert sb.stats()["batch"]["batches_created"] == 5  # 7+7+7+7+2
        line = len(json.dumps({"custom_id": "x" * 64, "body": reqs[0].messages})) + 100
        batch_engine(sb, tmp_path / "b", batch_max_bytes=line * 10).ask(reqs)
        assert sb.stats()["batch"]["batches_created"] >= 5 + 3


def test_expired_lines_are_sent_online_when_configured(ray_local, tmp_path):
    reqs, tasks = _requests(20, seed=4)
    with SandboxProcess(ServerOptions(batch_delay_s=0.2, batch_expire_rate=1.0)) as sb:
        engine = batch_engine(sb, tmp_path, batch_retry="online")
        results = engine.ask(reqs)
        assert [r.text for r in results] == [t.answer for t in tasks]
        stats = sb.stats()
        assert stats["batch"]["expired_lines"] == 10 and stats["served"] == 10  # 10 online
        assert engine.batch_stats["resubmitted"] == 10


def test_a_batch_obeys_the_budget(ray_local, tmp_path):
    reqs, _ = _requests(40, seed=5)
    with SandboxProcess(ServerOptions(batch_delay_s=0.2)) as sb:
        engine = batch_engine(sb, tmp_path, budget_usd=0.5)
        with pytest.raises(BudgetExceeded, match=r"budget_usd \$0.5 reached"):
            engine.ask(reqs)
        stats = sb.stats()["batch"]
        billed = 0.5 * cost_usd(stats["prompt_tokens"], stats["completion_tokens"], 1.0, 1.0)
        assert 0 < stats["lines"] < 40 and billed <= 0.5
        assert ledger.load(engine.ledger_dir).spent_usd == pytest.approx(billed)


@pytest.mark.slow
def test_sigkill_while_waiting_on_a_batch_resumes_the_same_batch(tmp_path):
    n = 30
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(t.as_record()) + "\n" for t in generate_tasks(n, seed=6)))
    out = tmp_path / "out.parquet"
    with SandboxProcess(ServerOptions(batch_delay_s=8)) as sb:
        cmd = answer_command(
            "configs/demo.yaml",
            pool,
            out,
            tmp_path / "run",
            f"teacher.base_url={sb.base_url}",
            "teacher.mode=batch",
            "teacher.batch_poll_s=0.5",
        )
        env = {**os.environ, "RAY_ADDRESS": ""}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
        records = tmp_path / "run" / "batches" / "teacher"
        deadline = time.time() + 120
        while time.time() < deadline and not any(
            json.loads(p.read_text())["status"] == "submitted" for p in records.glob("*.json")
        ):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, while it waits on its batch
        proc.wait()
        assert sb.stats()["batch"]["batches_created"] == 1 and not out.exists()
        rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
        assert len(rows) == n and all(r["status"] == "ok" for r in rows)  # no row lost
        stats = sb.stats()["batch"]
        assert stats["batches_created"] == 1 and stats["lines"] == n  # nothing submitted twice
        assert sb.stats()["served"] == 0  # and nothing went online
