"""Real students: chat-template Qwen2 and Llama checkpoints built locally, LoRA, their own dtype.

One prompt format everywhere (training, hf inference, the vLLM backend's input, serving),
full and LoRA fine-tuning with ZeRO-2 and ZeRO-3 on Ray Train, adapters continued across
rounds, exports in the base's dtype with tied weights tied."""

import json
import os
import shutil

import pyarrow as pa
import pytest
import torch
from openai import OpenAI
from safetensors import safe_open

from lion_ray.config import LoraConfig, ServeConfig, StudentConfig, TinyStudentConfig
from lion_ray.engines.inference import HFGenerator, _prompt_ids
from lion_ray.engines.training import build_sequences, train_student
from lion_ray.formats import PromptFormat
from lion_ray.logic.examples import IGNORE
from lion_ray.models import BASE_POINTER, load_tokenizer
from lion_ray.student import init_student
from lion_ray.weights import diff, load_tensors, recover

from ..conftest import MEMORIZED
from ..helpers import answers_table, free_port, memorize, tiny_train

CHAT = StudentConfig(prompt_format="chat")
SHAPE = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 1,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
}
KINDS = {
    "qwen2": TinyStudentConfig(architecture="qwen2", chat_template="chatml", **SHAPE),
    "llama": TinyStudentConfig(
        architecture="llama", chat_template="llama3", tie_word_embeddings=False, **SHAPE
    ),
}
CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Reverse 'kato'."},
    {"role": "assistant", "content": "otak"},
    {"role": "user", "content": "And uppercase it?"},
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-students")
    for name, cfg in KINDS.items():
        init_student(str(root / name), cfg)
    return root


def _answers(pairs):
    return answers_table(
        [{"id": f"{i:03d}", "instruction": q, "answer": a} for i, (q, a) in enumerate(pairs)]
    )


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_one_prompt_on_every_path(bases, kind):
    """The prompt ids are the same in training, the hf backend, the vLLM backend's input and
    serving; special tokens once, as the template writes them; the loss covers the
    assistant turn and its end-of-turn token only."""
    base = str(bases / kind)
    tok = load_tokenizer(base)
    fmt = PromptFormat(tok, "chat")
    question = "Reverse 'kato'."
    prompt = fmt.prompt_ids(question, "")
    # training
    (seq,), _ = build_sequences(
        [{"instruction": question, "input": "", "answer": "otak"}], fmt, 96, packing=False
    )
    n = seq.labels.index(next(t for t in seq.labels if t != IGNORE))
    assert seq.input_ids[:n] == prompt
    # hf inference
    assert HFGenerator.for_student(base, CHAT).format.prompt_ids(question, "") == prompt
    # the vLLM backend's input (token ids, so vLLM adds nothing of its own)
    column = _prompt_ids(CHAT, base, 4096)(pa.table({"instruction": [question], "input": [""]}))
    assert column.to_pylist() == [prompt]
    # serving
    assert fmt.conversation_ids([{"role": "user", "content": question}]) == prompt
    tokens = tok.convert_ids_to_tokens(prompt)
    if kind == "llama":  # the template writes the BOS; nothing adds a second one
        assert tokens[0] == "<|begin_of_text|>" and tokens.count("<|begin_of_text|>") == 1
    else:
        assert tokens[0] == "<|im_start|>" and tok.bos_token not in tokens
    # the teacher is asked the plain instruction, whatever the student's format
    from lion_ray.logic.prompts import teacher_messages

    assert teacher_messages(question)[-1] == {"role": "user", "content": question}
    target = [t for t in seq.labels if t != IGNORE]
    assert tok.convert_ids_to_tokens(target) == ["o", "t", "a", "k", tok.eos_token]
    assert tok.eos_token in ("<|im_end|>", "<|eot_id|>")


def test_a_format_the_model_cannot_speak_is_refused(tiny_student):
    from lion_ray.errors import LionError

    with pytest.raises(LionError, match="has no chat template; use 'alpaca' or 'compact'"):
        HFGenerator.for_student(str(tiny_student), CHAT)


def _train(answers, base, out, *, zero, lora=None, crash_at_step=None, **extra):
    train = tiny_train(epochs=3, zero_stage=zero, lora=lora, checkpoint_every_steps=2, **extra)
    return train_student(
        answers,
        train,
        base_model=str(base),
        out_uri=str(out),
        storage_path=f"{out}.checkpoints",
        student=CHAT,
        show_progress=False,
        crash_at_step=crash_at_step,
    )


def _weights(model_dir) -> dict:
    return load_tensors(model_dir)


def _round_trips(base, tuned, tmp) -> bool:
    """The export's delta against its base recovers it bit for bit."""
    diff(str(base), str(tuned), str(tmp / "delta"))
    recover(str(base), str(tmp / "delta"), str(tmp / "recovered"))
    a, b = _weights(tuned), _weights(tmp / "recovered")
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
        for k in a
    )


def _keys(model_dir) -> set[str]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, zero, lora",
    # with the adapter test below (LoRA ZeRO-3, then ZeRO-2) and the command-line bf16 tests
    # in test_weights, every architecture meets full and LoRA training and both ZeRO stages
    [("qwen2", 2, None), ("llama", 3, "merged")],
)
def test_full_and_lora_fine_tuning_export_the_bases_architecture(
    ray_local, bases, tmp_path, kind, zero, lora
):
    base = bases / kind
    out = tmp_path / "model"
    pairs = [(q, a) for q, a in MEMORIZED] * 8
    metrics = _train(
        _answers(pairs), base, out, zero=zero, lora=LoraConfig(r=4, export=lora) if lora else None
    )
    assert metrics["loss_last"] < metrics["loss_first"]
    if lora:
        assert metrics["trainable_parameters"] < metrics["parameters"] / 10
    # the export is the base's architecture: tied weights stay tied (no lm_head of its own)
    assert ("lm_head.weight" in _keys(out)) == ("lm_head.weight" in _keys(base))
    assert _round_trips(base, out, tmp_path)
    gen = HFGenerator.for_student(str(out), CHAT)
    assert gen.generate([(MEMORIZED[0][0], "")])[0]["finish_reason"] in ("stop", "length")


@pytest.mark.slow
def test_an_adapter_continues_round_over_round_and_resumes_after_a_failure(
    ray_local, bases, tmp_path
):
    base = bases / "qwen2"
    pairs = [(q, a) for q, a in MEMORIZED] * 8
    lora = LoraConfig(r=4, export="adapter")
    # round 1 on the GPU path's settings: bf16, ZeRO-3 with every parameter partitioned at
    # load, gradient checkpointing through frozen partitioned weights (DeepSpeed >= 0.19.3)
    first = _train(
        _answers(pairs),
        base,
        tmp_path / "r1",
        zero=3,
        lora=lora,
        crash_at_step=5,
        precision="bf16",
        gradient_checkpointing=True,
        deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    )
    assert first["resumed_from_step"] in (2, 4)  # a worker died; an adapter checkpoint restored
    assert first["loaded_parameters_per_rank"] < first["parameters"]
    r1 = tmp_path / "r1"
    assert (r1 / "adapter_config.json").exists() and not (r1 / "model.safetensors").exists()
    pointer = json.loads((r1 / BASE_POINTER).read_text())
    assert pointer["base"] == str(base)
    assert os.path.normpath(os.path.join(r1, pointer["relative"])) == str(base)
    second = _train(_answers(pairs), r1, tmp_path / "r2", zero=2, lora=lora)
    # round 2 trains the same adapter further: it starts where round 1 ended
    assert second["loss_first"] < first["loss_first"]
    assert abs(second["loss_first"] - first["loss_last"]) < 0.5 * first["loss_first"]
    assert json.loads((tmp_path / "r2" / BASE_POINTER).read_text())["base"] == str(base)
    # inference loads the adapter on its base; a moved run directory still finds the base
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "r2", moved / "r2")
    shutil.copytree(base, moved / "chat-students0" / "qwen2")
    (moved / "r2" / BASE_POINTER).write_text(
        json.dumps({"base": "/nowhere/qwen2", "relative": "../chat-students0/qwen2"})
    )
    here = HFGenerator.for_student(str(tmp_path / "r2"), CHAT).generate([(MEMORIZED[1][0], "")])
    there = HFGenerator.for_student(str(moved / "r2"), CHAT).generate([(MEMORIZED[1][0], "")])
    assert here == there


@pytest.fixture(scope="module")
def chat_student(bases, tmp_path_factory):
    """A Qwen2 chat student that learned single questions and one multi-turn conversation."""
    out = tmp_path_factory.mktemp("taught-chat") / "qwen2"
    shutil.copytree(bases / "qwen2", out)
    memorize(
        out,
        [*MEMORIZED, ("And uppercase it?", "WHAT"), (CONVERSATION, "OTAK")],
        template="chat",
        steps=250,
    )
    return out


def test_hf_inference_answers_in_the_chat_format(chat_student):
    gen = HFGenerator.for_student(str(chat_student), CHAT)
    out = gen.generate([(q, "") for q, _ in MEMORIZED])
    assert [o["answer"] for o in out] == [a for _, a in MEMORIZED]
    assert all(o["finish_reason"] == "stop" for o in out)  # stopped at <|im_end|>


def test_serving_speaks_the_models_chat_format(ray_local, chat_student):
    """System messages, history and content-part arrays go through the chat template."""
    from ray import serve

    from lion_ray.engines.serving import deploy

    port = free_port()
    url = deploy(
        ServeConfig(port=port), student=CHAT, model_dir=str(chat_student), name="chat-students"
    )
    try:
        c = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)

        def ask(messages):
            r = c.chat.completions.create(model="m", messages=messages, max_tokens=8)
            return r.choices[0].message.content

        assert ask(CONVERSATION) == "OTAK"  # the whole conversation, not its last line
        assert ask([{"role": "user", "content": "And uppercase it?"}]) == "WHAT"
        parts = [m | {"content": [{"type": "text", "text": m["content"]}]} for m in CONVERSATION]
        assert ask(parts) == "OTAK"
    finally:
        serve.delete("chat-students")
