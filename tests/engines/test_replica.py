"""A serving replica's lifecycle on a fake backend, without Serve: swaps (in place, beside,
retiring the old engine first), the 503 window, drains, sleep and wake, a failed swap that
must not leave a dead engine serving, and the stage row API. Each test takes milliseconds;
tests/engines/test_serving.py keeps one Serve test for each path that needs Serve."""

from __future__ import annotations

import asyncio
import time

import pytest

from lion_ray.config import ServeConfig, StudentConfig
from lion_ray.engines.student.backend import TornWeights
from lion_ray.engines.student.replica import Replica
from lion_ray.engines.student.wire import ServeError
from tests.fakes import FakeLoader

GPU_VLLM = (ServeConfig(backend="vllm"), StudentConfig(backend="vllm", vllm_device="gpu"))
HF = (ServeConfig(backend="hf"), StudentConfig())


def replica(kind=GPU_VLLM, first: str = "a1") -> tuple[Replica, FakeLoader]:
    loader = FakeLoader()
    rep = Replica(*kind, loader)
    rep.start(first)
    return rep, loader


async def _answer(rep: Replica, text: str = "hi") -> dict:
    return (await rep.generate_jobs([(list(text.encode()), 4, 0.0, 1.0, None)]))[0]


async def _until(condition, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def _refusal(rep: Replica) -> str | None:
    try:
        rep.available()
    except ServeError as exc:
        assert exc.status == 503 and exc.headers["Retry-After"]
        return exc.code
    return None


def test_a_new_round_moves_in_place_and_a_request_waits_instead_of_failing():
    async def main():
        rep, loader = replica()
        loader.gate.clear()  # a request in flight holds the swap's drain
        request = asyncio.create_task(_answer(rep))
        await _until(lambda: rep.model.inflight == 1, "the request to start")
        swap = asyncio.create_task(rep.swap_to("a2"))
        await asyncio.sleep(0.02)
        assert not swap.done() and _refusal(rep) is None  # held back, not refused
        loader.gate.set()
        assert (await request)["answer"] == "a1:2"  # finished on the weights it started with
        assert await swap is True
        assert rep.last_swap["how"] == "in_place" and loader.loaded == ["a1"]
        assert (await _answer(rep))["answer"] == "a2:2"

    asyncio.run(main())


def test_retire_first_refuses_with_503_until_the_new_engine_is_up():
    """vLLM on a GPU: two engines do not fit, so the old one retires first; in-flight
    requests finish, new ones get 503 with Retry-After for the whole window."""

    async def main():
        rep, loader = replica()
        loader.gate.clear()
        loader.load_gate.clear()
        in_flight = asyncio.create_task(_answer(rep))
        await _until(lambda: rep.model.inflight == 1, "the request to start")
        old = rep.model
        swap = asyncio.create_task(rep.swap_to("b1"))  # another family: a new engine
        await _until(lambda: rep.retiring, "the swap to begin")
        assert _refusal(rep) == "model_swapping"
        loader.gate.set()
        assert (await in_flight)["answer"] == "a1:2"
        await _until(lambda: old.closed, "the old engine to retire")
        assert _refusal(rep) == "model_swapping"  # still loading the new one
        loader.load_gate.set()
        assert await swap is True
        assert rep.last_swap["how"] == "retire_first" and _refusal(rep) is None
        assert (await _answer(rep))["answer"] == "b1:2"

    asyncio.run(main())


def test_beside_keeps_answering_while_the_new_engine_loads():
    async def main():
        rep, loader = replica(HF)
        loader.load_gate.clear()
        swap = asyncio.create_task(rep.swap_to("b1"))
        await asyncio.sleep(0.02)
        assert (await _answer(rep))["answer"] == "a1:2" and _refusal(rep) is None
        loader.load_gate.set()
        await swap
        assert rep.last_swap["how"] == "beside"
        assert (await _answer(rep))["answer"] == "b1:2"

    asyncio.run(main())


def test_a_failed_swap_frees_the_failed_engine_before_the_old_one_loads_again():
    """The defect: the failure's traceback kept the half-built engine (its GPU memory)
    alive while the old model loaded again, so the reload failed vLLM's free-memory check
    and the replica kept a retired engine. Now the failed engine is gone first."""

    async def main():
        rep, loader = replica()
        loader.failures["b1"] = ValueError("this tokenizer has no chat template")
        with pytest.raises(ValueError, match="chat template"):
            await rep.swap_to("b1")
        assert loader.alive_at_load == [False, False, False]  # first load, b1, a1 again
        assert loader.loaded == ["a1", "a1"]
        assert rep.model_dir == "a1" and rep.model is not None and not rep.model.closed
        assert rep.last_swap["ok"] is False and "chat template" in rep.last_swap["error"]
        rep.check_health()
        assert (await _answer(rep))["answer"] == "a1:2"

    asyncio.run(main())


def test_a_replica_whose_old_model_cannot_load_either_reports_unhealthy_then_recovers():
    async def main():
        rep, loader = replica()
        loader.failures["b1"] = RuntimeError("CUDA out of memory")
        loader.failures["a1"] = RuntimeError("CUDA out of memory")
        with pytest.raises(RuntimeError):
            await rep.swap_to("b1")
        assert rep.model is None
        with pytest.raises(RuntimeError, match="has no engine.*out of memory.*Serve replaces it"):
            rep.check_health()
        assert _refusal(rep) == "model_unavailable"
        del loader.failures["b1"]
        assert await rep.swap_to("b1") is True  # the next move loads what it is asked
        rep.check_health()
        assert rep.last_swap["how"] == "loaded"

    asyncio.run(main())


def test_torn_weights_serve_the_old_round_from_a_clean_engine():
    async def main():
        rep, loader = replica()
        loader.reload_failures["a2"] = TornWeights("reloading a2 failed half way")
        first = rep.model
        with pytest.raises(TornWeights):
            await rep.swap_to("a2")
        assert first.closed and rep.model is not first and rep.model_dir == "a1"
        assert loader.loaded == ["a1", "a1"]
        assert (await _answer(rep))["answer"] == "a1:2"

    asyncio.run(main())


def test_a_dead_engine_fails_the_health_check():
    rep, _ = replica()
    rep.check_health()
    rep.model.dead = True
    with pytest.raises(RuntimeError, match="has died"):
        rep.check_health()


def test_sleep_refuses_then_a_move_wakes_it_and_a_restart_asleep_loads_nothing():
    async def main():
        rep, loader = replica()
        await rep.sleep()
        assert rep.model.asleep and _refusal(rep) == "model_asleep"
        rep.check_health()  # asleep is not dead
        report = await rep.move_to("a2")
        assert report["serving"] == "a2" and not report["asleep"] and not rep.model.asleep
        await rep.sleep()
        await rep.move_to("a2")  # the same model: woken as it is
        assert not rep.asleep and not rep.model.asleep

        restarted = Replica(*GPU_VLLM, loader)
        restarted.start("a2", asleep=True)
        assert restarted.model is None and loader.loaded == ["a1"]
        assert restarted.swap_report()["loaded"] is False
        await restarted.reconfigure({"model_dir": "a2"})
        assert restarted.model is not None and loader.loaded == ["a1", "a2"]

    asyncio.run(main())


def test_stage_rows_carry_a_seed_each_and_a_row_that_fails_alone():
    async def main():
        rep, _ = replica(first="a1")
        rows = [
            {"id": f"r{i}", "instruction": text, "input": ""}
            for i, text in enumerate(["one", "!bad", "three"])
        ]
        reply = await rep.answer_rows(rows)
        outs = reply["outs"]
        assert outs[0]["answer"] == "a1:3" and outs[2]["answer"] == "a1:5"
        assert "cannot format" in outs[1]["error"]
        assert len(set(rep.model.seeds)) == 2  # one seed per row, not one for all
        reply = await rep.answer_rows(rows[:1], model_dir="a2")  # the stage's student first
        assert rep.model_dir == "a2" and reply["outs"][0]["answer"] == "a2:3"
        losses = await rep.loss_rows([{**rows[0], "answer": "x" * 50}], max_length=16)
        assert losses["losses"] == [16.0] and losses["error"] == ""

    asyncio.run(main())
