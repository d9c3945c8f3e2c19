"""The GPU paths on one GPU: what `python -m bench.gpu_smoke` runs and times.

bf16 ZeRO-3 training (full and LoRA) of a tiny Qwen2-class student with a worker that dies
and a resume; ray.data.llm vLLM inference with a LoRA adapter and from an s3:// model (a
moto server); a vLLM hot swap on one GPU under concurrent clients (weights into the running
engine, an adapter in place, and a swap that must retire the old engine first); the
colocated engine asleep while Ray Train runs; and one `lion-ray run` round with the student
on the GPU. They need CUDA and skip (saying so) without it. The students are saved in
bf16, the dtype vLLM's GPU attention kernels run.
"""

import json
import shutil
import subprocess
import sys

import pytest

from lion_ray.config import LoraConfig, ServeConfig, StudentConfig, TinyStudentConfig
from lion_ray.engines.inference import student_answers
from lion_ray.engines.training import train_student
from lion_ray.logic.pools import import_records

from ..conftest import MEMORIZED, MEMORIZED_B, ROOT
from ..helpers import (
    Hammer,
    MotoS3,
    answers_table,
    free_port,
    http_json,
    memorize,
    tiny_train,
    until,
)

pytestmark = pytest.mark.gpu
CHAT = StudentConfig(prompt_format="chat")
SHAPE = dict(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128)
# each engine takes a share of the one GPU, so a test's engines never crowd another's
GPU_SHARE = {"gpu_memory_utilization": 0.3}


def _qwen(root, name, pairs=None):
    from lion_ray.student import init_student

    out = root / name
    init_student(
        str(out),
        TinyStudentConfig(
            architecture="qwen2",
            chat_template="chatml",
            max_position_embeddings=256,
            **SHAPE,
        ),
    )
    if pairs:
        memorize(out, pairs, template="chat", steps=250)
    _to_bf16(out)
    return out


def _to_bf16(model_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from lion_ray import storage

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(model_dir)
    storage.write_checksums(model_dir)


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-students")
    return {
        "base": _qwen(root, "base"),
        "a": _qwen(root, "a", MEMORIZED),
        "b": _qwen(root, "b", MEMORIZED_B),
    }


def _vllm(model, **kw) -> StudentConfig:
    return CHAT.model_copy(
        update={
            "model_path": str(model),
            "backend": "vllm",
            "max_new_tokens": 12,
            "engine_kwargs": GPU_SHARE,
        }
        | kw
    )


def _pool(questions):
    return import_records([({"instruction": q}, "x") for q in questions], source="t")[0]


@pytest.mark.parametrize("lora", [None, "adapter"], ids=["full", "lora"])
def test_bf16_zero3_training_with_a_resume(ray_local, students, tmp_path, lora):
    rows = [{"id": f"{i:03d}", "instruction": q, "answer": a} for i, (q, a) in enumerate(MEMORIZED)]
    metrics = train_student(
        answers_table(rows * 16),
        tiny_train(
            epochs=4,
            effective_batch_size=4,
            workers=1,
            gpus_per_worker=1,
            zero_stage=3,
            lora=LoraConfig(r=4, export=lora) if lora else None,
            gradient_checkpointing=bool(lora),
            checkpoint_every_steps=4,
            deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        ),
        base_model=str(students["base"]),
        out_uri=str(tmp_path / "model"),
        storage_path=str(tmp_path / "ckpt"),
        student=CHAT,
        show_progress=False,
        crash_at_step=10,
    )
    assert metrics["resumed_from_step"] in (4, 8)  # the worker died; a checkpoint restored
    assert metrics["loss_last"] < metrics["loss_first"]
    assert metrics["export_dtype"] == "bfloat16"  # the base's
    if not lora:
        config = json.loads((tmp_path / "model" / "config.json").read_text())
        assert config["dtype"] == "bfloat16"


def test_vllm_inference_with_a_lora_adapter(ray_local, students, tmp_path):
    adapter = _adapter(students, tmp_path)
    questions = [q for q, _ in MEMORIZED]
    table, summary = student_answers(_pool(questions), _vllm(adapter), show_progress=False)
    assert summary["failed"] == 0
    assert [r["answer"] for r in table.to_pylist()] == [a for _, a in MEMORIZED_B]


def _adapter(students, tmp_path):
    """A LoRA adapter on student 'a' that answers MEMORIZED_B, exported as lion-ray does."""
    metrics_dir = tmp_path / "adapter"
    rows = [
        {"id": f"{i:03d}", "instruction": q, "answer": a} for i, (q, a) in enumerate(MEMORIZED_B)
    ]
    train_student(
        answers_table(rows * 32),
        tiny_train(
            lr=5e-3,
            epochs=6,
            micro_batch_size=8,
            workers=1,
            gpus_per_worker=1,
            lora=LoraConfig(r=8, target_modules="all-linear", export="adapter"),
        ),
        base_model=str(students["a"]),
        out_uri=str(metrics_dir),
        storage_path=str(tmp_path / "adapter-ckpt"),
        student=CHAT,
        show_progress=False,
    )
    assert json.loads((metrics_dir / "lion_ray_base.json").read_text())["base"]
    return metrics_dir


def test_vllm_inference_from_an_s3_model(students, tmp_path):
    """The engine downloads the model on its own node (Ray's model download); the driver
    fetches the tokenizer only."""
    import ray

    from lion_ray import storage
    from lion_ray.config import ClusterConfig
    from lion_ray.engines.cluster import init_ray

    with MotoS3("lion-gpu"):
        ray.shutdown()  # nodes must start with the store's settings in their environment
        init_ray(ClusterConfig(num_cpus=8, dashboard=False), quiet=True)
        try:
            uri = "s3://lion-gpu/models/a"
            storage.publish_dir(students["a"], uri)
            table, summary = student_answers(
                _pool([q for q, _ in MEMORIZED]), _vllm(uri), show_progress=False
            )
            assert summary["failed"] == 0
            assert [r["answer"] for r in table.to_pylist()] == [a for _, a in MEMORIZED]
        finally:
            ray.shutdown()
    init_ray(ClusterConfig(num_cpus=8, dashboard=False), quiet=True)


def test_vllm_hot_swap_on_one_gpu_under_concurrent_clients(ray_local, students, tmp_path):
    """A new round's student moves into the running engine; a model of another
    architecture can only come as a new engine, which on one GPU means the old one retires
    first (503 with Retry-After meanwhile); no request fails otherwise."""
    from ray import serve

    from lion_ray.engines.student.app import deploy
    from lion_ray.student import init_student

    other = tmp_path / "other"  # another architecture: two layers more
    init_student(
        str(other), TinyStudentConfig(**(SHAPE | {"num_layers": 4}), chat_template="chatml")
    )
    _to_bf16(other)
    plain = tmp_path / "plain"  # no chat template: the replica's chat format cannot serve it
    init_student(str(plain), TinyStudentConfig(**(SHAPE | {"num_layers": 4})))
    _to_bf16(plain)
    url = deploy(
        ServeConfig(
            port=free_port(),
            backend="vllm",
            gpus_per_replica=1,
            max_tokens_cap=64,
            reload_allow=[str(students["b"].parent), str(tmp_path)],
        ),
        student=_vllm(students["a"], engine_kwargs={"gpu_memory_utilization": 0.6}),
        model_dir=str(students["a"]),
        name="gpu-student",
    )
    question, answer = MEMORIZED[0]
    try:
        with Hammer(url, question, threads=8) as load:
            status, body = http_json(
                f"{url}/v1/admin/reload", body={"model_dir": str(students["b"])}, timeout=600
            )
            assert status == 200 and body["swap"]["how"] == "in_place", body
            load.wait_for(MEMORIZED_B[0][1])
            assert not load.failures() and not load.refused(), load.outcomes[:3]
            # a model the replica cannot serve fails before any engine is built for it: the
            # replica still serves b, healthy, with the GPU memory it had
            status, body = http_json(
                f"{url}/v1/admin/reload", body={"model_dir": str(plain)}, timeout=600
            )
            assert status == 500 and "template" in body["error"]["message"], body
            status, state = http_json(f"{url}/v1/admin/status")
            assert state["model_dir"] == str(students["b"]) and state["healthy"], state
            answered = len(load.answers())
            until(lambda: len(load.answers()) > answered, "answers after the failed swap")
            assert load.answers()[-1] == MEMORIZED_B[0][1]
            status, body = http_json(
                f"{url}/v1/admin/reload", body={"model_dir": str(other)}, timeout=600
            )
            assert status == 200 and body["swap"]["how"] == "retire_first", body
    finally:
        serve.delete("gpu-student")
    assert not load.failures(), load.failures()[:3]  # 503s while it retired, nothing else
    assert {error for _, _, error, _ in load.refused()} <= {"model_swapping"}


def test_colocated_engine_sleeps_while_training(ray_local, students, tmp_path):
    """student.colocate: the run's engine drops its weights and KV cache while Ray Train
    uses the GPU, then the new round's weights move in: one GPU holds both in turn."""
    from lion_ray.engines.student.engine import StudentEngine

    cfg = _vllm(students["a"], colocate=True, engine_kwargs={"gpu_memory_utilization": 0.5})
    engine = StudentEngine.start(cfg, str(students["a"]), http=False)
    try:
        pool = _pool([q for q, _ in MEMORIZED])
        before, _ = student_answers(
            pool, cfg, model_uri=str(students["a"]), engine=engine, show_progress=False
        )
        assert [r["answer"] for r in before.to_pylist()] == [a for _, a in MEMORIZED]
        engine.sleep()
        rows = [
            {"id": f"{i:03d}", "instruction": q, "answer": a}
            for i, (q, a) in enumerate(MEMORIZED_B)
        ]
        train_student(
            answers_table(rows * 32),
            tiny_train(lr=5e-3, epochs=6, micro_batch_size=8, workers=1, gpus_per_worker=1),
            base_model=str(students["a"]),
            out_uri=str(tmp_path / "next"),
            storage_path=str(tmp_path / "next-ckpt"),
            student=cfg,  # colocated: the worker takes the rest of the engine's GPU
            show_progress=False,
            beside_engine=True,
            held={"the student engine": engine.request},
        )
        # training exported the base's tokenizer files unchanged: the move is in place,
        # through sleep -> wake weights -> reload -> wake KV cache
        swap = engine.load(str(tmp_path / "next"))
        assert swap["how"] == "in_place", swap
        from lion_ray.engines.inference import student_losses

        rows = [dict(r, input="") for r in rows]
        on_engine, _ = student_losses(
            rows, cfg, model_uri=str(tmp_path / "next"), max_length=24, engine=engine
        )
        on_hf, _ = student_losses(
            rows,
            CHAT.model_copy(update={"gpus_per_engine": 0.2}),
            model_uri=str(tmp_path / "next"),
            max_length=24,
        )
        assert on_engine == pytest.approx(
            on_hf, rel=2e-2
        )  # bf16 on both: the tokens training learns
        after, _ = student_answers(
            pool, cfg, model_uri=str(tmp_path / "next"), engine=engine, show_progress=False
        )
        assert [r["answer"] for r in after.to_pylist()] == [a for _, a in MEMORIZED_B]
    finally:
        engine.stop()


def test_one_round_with_the_student_on_the_gpu(tmp_path):
    config = tmp_path / "gpu.yaml"
    config.write_text((ROOT / "tests" / "data" / "mini.yaml").read_text())
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "lion_ray",
            "run",
            "--config",
            str(config),
            "--no-progress",
            *("--set", f"storage.run_dir={tmp_path / 'run'}"),
            *("--set", "train.gpus_per_worker=1", "--set", "train.workers=1"),
            *("--set", "train.effective_batch_size=8"),
            *("--set", "student.backend=vllm", "--set", "student.tiny.dtype=bfloat16"),
            *("--set", "student.colocate=true"),
            *("--set", "student.engine_kwargs={gpu_memory_utilization: 0.4}"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert "round_1/pools" in manifest["stages"]  # the test config runs the last round whole
    moves = manifest["stages"]["round_1/discrimination.student"]["metrics"]
    assert moves["served_model"] == "round_1/imitation/model"
    train = manifest["stages"]["round_1/imitation.train"]["metrics"]
    assert train["export_dtype"] == "bfloat16"
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
