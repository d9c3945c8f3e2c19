"""Delta weights: bit-exact round trip on tiny models, an added pad token, a wrong base refused."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lion_ray.config import TinyStudentConfig
from lion_ray.errors import LionError
from lion_ray.student import init_student
from lion_ray.weights import DELTA_FILE, diff, load_tensors, recover

from .conftest import ROOT


def _tuned_with_pad_token(base, out):
    """A fine-tuned variant of ``base`` whose tokenizer gained a pad token (vocab + 1)."""
    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    tok.add_special_tokens({"pad_token": "<extra_pad>"})
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _bits_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
        for k in a
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    cfg = TinyStudentConfig(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128)
    init_student(str(root / "base"), cfg)
    init_student(str(root / "other"), cfg.model_copy(update={"seed": 1}))
    _tuned_with_pad_token(root / "base", root / "tuned")
    return root


def test_round_trip_is_bit_exact_with_an_added_pad_token(models, tmp_path):
    info = diff(str(models / "base"), str(models / "tuned"), str(tmp_path / "delta"))
    assert info["added_rows"] == 1
    assert not list(
        (tmp_path / "delta").glob("model*.safetensors")
    )  # only the delta, not the weights
    recover(str(models / "base"), str(tmp_path / "delta"), str(tmp_path / "recovered"))
    assert _bits_equal(load_tensors(models / "tuned"), load_tensors(tmp_path / "recovered"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "recovered")
    tok = AutoTokenizer.from_pretrained(tmp_path / "recovered")
    assert tok.pad_token == "<extra_pad>" and model.get_input_embeddings().weight.shape[0] == len(
        tok
    )


def test_a_mismatched_base_is_refused(models, tmp_path):
    diff(str(models / "base"), str(models / "tuned"), str(tmp_path / "delta"))
    with pytest.raises(LionError, match="is not the base this delta was made against"):
        recover(str(models / "other"), str(tmp_path / "delta"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_corrupted_delta_fails_the_integrity_check(models, tmp_path):
    diff(str(models / "base"), str(models / "tuned"), str(tmp_path / "delta"))
    path = tmp_path / "delta" / DELTA_FILE
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(LionError, match="integrity check failed"):
        recover(str(models / "base"), str(tmp_path / "delta"), str(tmp_path / "out"))


def test_different_architectures_cannot_be_diffed(models, tmp_path):
    other = tmp_path / "wide"
    init_student(
        str(other),
        TinyStudentConfig(hidden_size=32, num_layers=2, num_heads=1, intermediate_size=64),
    )
    with pytest.raises(LionError, match="shape"):
        diff(str(models / "base"), str(other), str(tmp_path / "delta"))


def test_cli_diff_and_recover(models, tmp_path):
    def lion(*args):
        return subprocess.run(
            [sys.executable, "-m", "lion_ray", "weights", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )

    res = lion(
        "diff",
        "--base",
        str(models / "base"),
        "--tuned",
        str(models / "tuned"),
        "--out",
        str(tmp_path / "d"),
    )
    assert res.returncode == 0 and "1 added embedding rows" in res.stdout
    res = lion(
        "recover",
        "--base",
        str(models / "base"),
        "--diff",
        str(tmp_path / "d"),
        "--out",
        str(tmp_path / "t"),
    )
    assert res.returncode == 0 and "verified" in res.stdout
    bad = lion(
        "recover",
        "--base",
        str(models / "other"),
        "--diff",
        str(tmp_path / "d"),
        "--out",
        str(tmp_path / "x"),
    )
    assert bad.returncode == 1 and "is not the base" in bad.stderr
    shutil.rmtree(tmp_path / "t")


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, tied, lora",
    [("qwen2", True, []), ("llama", False, ["--set", "train.lora.r=4"])],
    ids=["qwen2-bf16-tied-full", "llama-bf16-untied-lora-merged"],
)
def test_release_flow_from_the_command_line_in_bf16(tmp_path, arch, tied, lora):
    """`student init` -> `train` -> `weights diff` -> `weights recover`, as a user types them
    (relative paths): the export keeps the base's dtype and tied weights, and its delta
    round-trips bit for bit."""
    import pyarrow.parquet as pq

    from .helpers import answers_table

    def lion(*args):
        res = subprocess.run(
            [sys.executable, "-m", "lion_ray", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**__import__("os").environ, "RAY_ADDRESS": ""},
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    tiny = [
        *("--set", f"student.tiny.architecture={arch}"),
        *("--set", "student.tiny.dtype=bfloat16"),
        *("--set", f"student.tiny.tie_word_embeddings={str(tied).lower()}"),
        *("--set", "student.tiny.hidden_size=64", "--set", "student.tiny.num_heads=1"),
        *("--set", "student.tiny.num_layers=2", "--set", "student.tiny.intermediate_size=128"),
    ]
    lion("student", "init", "--out", "base", *tiny)
    rows = [
        {"id": str(i), "instruction": f"Reverse 'ab{i}'.", "answer": f"{i}ba"} for i in range(16)
    ]
    pq.write_table(answers_table(rows), tmp_path / "answers.parquet")
    lion(
        "train",
        *("--data", "answers.parquet", "--model", "base", "--out", "runs/tuned"),
        *("--set", "train.epochs=1", "--set", "train.max_length=64"),
        *("--set", "train.micro_batch_size=4", "--set", "train.effective_batch_size=8"),
        *("--set", "student.prompt_format=compact"),
        *lora,
    )
    tuned = load_tensors(tmp_path / "runs" / "tuned")
    base = load_tensors(tmp_path / "base")
    assert set(tuned) == set(base)  # tied stays tied: no lm_head of its own
    assert ("lm_head.weight" in base) is (not tied)
    assert {t.dtype for t in tuned.values()} == {torch.bfloat16}
    # and its config says so: dtype="auto" loaders (and vLLM) load it in bf16, not fp32
    config = json.loads((tmp_path / "runs" / "tuned" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    assert any(not torch.equal(tuned[k], base[k]) for k in base)  # it did train
    lion("weights", "diff", "--base", "base", "--tuned", "runs/tuned", "--out", "delta")
    lion("weights", "recover", "--base", "base", "--diff", "delta", "--out", "recovered")
    assert _bits_equal(tuned, load_tensors(tmp_path / "recovered"))


def test_a_path_that_is_not_a_model_is_refused_in_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "lion_ray", "train", "--data", "a.parquet"]
        + ["--model", "no/such/dir", "--out", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--model: " in lines[0]
    assert f"{tmp_path}/no/such/dir is not a local model directory" in lines[0]
