"""The GPU paths: bf16 DeepSpeed ZeRO-3 on one GPU, vLLM student inference and vLLM serving.

They need a CUDA device and skip (saying so) without one; `python -m bench.gpu_smoke` runs
them on a GPU machine (with the `gpu` extra installed) and prints one JSON line."""

import pytest

from lion_ray.config import ServeConfig, StudentConfig, TrainConfig
from lion_ray.engines.inference import student_answers
from lion_ray.engines.training import train_student
from lion_ray.logic.pools import import_records

from ..conftest import MEMORIZED
from ..helpers import answers_table, free_port

pytestmark = pytest.mark.gpu
COMPACT = StudentConfig(prompt_format="compact")


def test_bf16_zero3_on_one_gpu(ray_local, tiny_student, tmp_path):
    rows = [{"id": f"{i:03d}", "instruction": q, "answer": a} for i, (q, a) in enumerate(MEMORIZED)]
    metrics = train_student(
        answers_table(rows * 8),
        TrainConfig(
            lr=3e-3,
            epochs=3,
            max_length=96,
            micro_batch_size=4,
            effective_batch_size=4,
            workers=1,
            gpus_per_worker=1,
            zero_stage=3,
        ),
        base_model=str(tiny_student),
        out_uri=str(tmp_path / "model"),
        storage_path=str(tmp_path / "ckpt"),
        student=COMPACT,
        show_progress=False,
    )
    assert metrics["loss_last"] < metrics["loss_first"]
    assert metrics["export_dtype"] == "float32"  # the base's dtype, though trained in bf16


@pytest.mark.vllm
def test_vllm_student_inference_on_gpu(ray_local, taught_student):
    pool = import_records([({"instruction": q}, "x") for q, _ in MEMORIZED], source="t")[0]
    cfg = COMPACT.model_copy(
        update={"model_path": str(taught_student), "backend": "vllm", "max_new_tokens": 12}
    )
    table, summary = student_answers(pool, cfg, show_progress=False)
    assert summary["ok"] == len(MEMORIZED)
    assert [r["answer"] for r in table.to_pylist()] == [a for _, a in MEMORIZED]


@pytest.mark.vllm
def test_vllm_serving_on_gpu(ray_local, taught_student):
    from openai import OpenAI
    from ray import serve

    from lion_ray.engines.serving import deploy

    url = deploy(
        ServeConfig(port=free_port(), backend="vllm", gpus_per_replica=1),
        student=COMPACT,
        model_dir=str(taught_student),
        name="gpu-student",
    )
    try:
        c = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
        question, answer = MEMORIZED[0]
        reply = c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": question}], max_tokens=12
        )
        assert reply.choices[0].message.content == answer
    finally:
        serve.delete("gpu-student")
