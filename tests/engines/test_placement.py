"""Where training workers land on GPUs, and which device each trains on, with Ray's logical
GPUs: a local Ray given GPUs assigns them to tasks and actors exactly as on GPU nodes (and
sets CUDA_VISIBLE_DEVICES), so lion-ray's requests and its device rule are tested here; only
the CUDA calls wait for ``bench.gpu_smoke`` (tests/gpu/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lion_ray.config import ServeConfig, StudentConfig, TrainConfig
from lion_ray.engines.training import scaling_config, training_device, workers_request
from lion_ray.errors import LionError


def _where_workers_land(train: TrainConfig, request, out: Path) -> list[dict]:
    """A Ray Train worker group asked exactly as imitation asks it; each worker reports its
    GPU ids, CUDA_VISIBLE_DEVICES, local rank and the device lion-ray would train on."""
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def probe(config: dict) -> None:
        import os

        import ray
        import ray.train

        from lion_ray.engines.training import training_device

        ctx = ray.train.get_context()
        ids = [str(g) for g in ray.get_gpu_ids()]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        try:
            device, error = training_device(ids, visible, ctx.get_local_rank()), ""
        except Exception as exc:
            device, error = None, str(exc)
        report = {"gpu_ids": ids, "visible": visible, "device": device, "error": error}
        path = Path(config["out"]) / f"rank{ctx.get_world_rank()}.json"
        path.write_text(json.dumps(report | {"local_rank": ctx.get_local_rank()}))

    out.mkdir(parents=True, exist_ok=True)
    TorchTrainer(
        probe,
        train_loop_config={"out": str(out)},
        torch_config=TorchConfig(backend="gloo"),  # logical GPUs: no NCCL here
        scaling_config=scaling_config(train, request),
        run_config=RunConfig(name="placement", storage_path=str(out / "ray")),
    ).fit()
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


TRAIN = TrainConfig(workers=2, gpus_per_worker=1, cpus_per_worker=1, micro_batch_size=1)


def test_round_one_of_a_colocated_run_gives_each_worker_a_gpu_of_its_own(ray_local, tmp_path):
    """No engine holds its share yet: each worker asks a whole GPU. (Asking 0.49 each, as
    beside engines, Ray's best fit packs both onto GPU 0 and DeepSpeed's cuda:LOCAL_RANK
    is another worker's GPU or none: the device rule refuses that.)"""
    reports = _where_workers_land(TRAIN, workers_request(TRAIN, colocated=False), tmp_path / "a")
    assert len(reports) == 2 and all(not r["error"] for r in reports), reports
    assert len({r["gpu_ids"][0] for r in reports}) == 2
    assert [r["device"] for r in reports] == [r["local_rank"] for r in reports]

    packed = _where_workers_land(TRAIN, workers_request(TRAIN, colocated=True), tmp_path / "b")
    assert {r["gpu_ids"][0] for r in packed} == {"0"}  # what the old request got
    assert any("two workers share a GPU" in r["error"] for r in packed), packed


def test_workers_beside_a_sleeping_colocated_engine_get_one_engine_gpu_each(
    ray_local, taught_student, tmp_path
):
    """The run's engine (hf replicas asking a colocated GPU share) holds 0.51 of two GPUs;
    workers then ask the rest of one, and each lands beside an engine, on its own GPU."""
    from lion_ray.engines.student.engine import Method, StudentEngine

    student = StudentConfig(
        prompt_format="compact",
        colocate=True,
        gpus_per_engine=1,
        num_engines=2,
        cpus_per_engine=0.5,
    )
    engine = StudentEngine.start(
        student, str(taught_student), ServeConfig(), train=TRAIN, app="placement", http=False
    )
    try:
        replicas = engine._broadcast(Method.MOVE_TO, str(taught_student))
        engine_gpus = sorted(r["gpu_ids"][0] for r in replicas)
        assert len(set(engine_gpus)) == 2 and engine.request.bundle["GPU"] == 0.51
        reports = _where_workers_land(
            TRAIN, workers_request(TRAIN, colocated=True), tmp_path / "beside"
        )
    finally:
        engine.stop()
    assert all(not r["error"] for r in reports), reports
    assert sorted(r["gpu_ids"][0] for r in reports) == engine_gpus


def test_the_device_rule_agrees_with_ray_train_and_refuses_what_deepspeed_would_not():
    # four workers, one GPU each: the device is the GPU's place among those visible
    assert training_device(["2"], "0,1,2,3", 2) == 2
    assert training_device([1.0], "1,3", 0) == 0  # ids may come as floats; GPUs 1 and 3
    with pytest.raises(LionError, match="two workers share a GPU"):
        training_device(["0"], "0", 1)
    with pytest.raises(LionError, match="exactly one GPU"):
        training_device(["2", "3"], "0,1,2,3", 1)  # two per worker: DeepSpeed takes cuda:1
    with pytest.raises(ValueError, match="less than or equal to 1"):
        TrainConfig(gpus_per_worker=2)
