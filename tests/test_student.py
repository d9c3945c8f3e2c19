import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lion_ray.config import TinyStudentConfig
from lion_ray.student import init_student, train_tokenizer


def test_init_student_loads_with_from_pretrained(tmp_path):
    out = tmp_path / "student"
    info = init_student(
        str(out),
        TinyStudentConfig(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128),
    )
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and info["parameters"] == sum(
        p.numel() for p in model.parameters()
    )
    ids = tok("Reverse 'kato'.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert tok.padding_side == "left" and tok.eos_token == "</s>"
    assert not list(tmp_path.glob(".*tmp*"))


def test_tokenizer_is_byte_level_and_lossless():
    tok = train_tokenizer(["hello world"] * 5, vocab_size=260)
    for text in ["Reverse 'planet'.\n### Response:\n", "naïve café ✓", "  two  spaces"]:
        assert tok.decode(tok(text).input_ids) == text
    assert len(tok("abc").input_ids) == 3  # character level at 260


def test_tokenizer_learns_merges_from_local_text():
    tok = train_tokenizer(["the theory of the thing"] * 50, vocab_size=300)
    assert len(tok) > 260
    assert len(tok("the theory").input_ids) < len("the theory")


def test_only_a_student_of_one_shape_and_one_tokenizer_fits_in_place(tmp_path):
    """A running engine reloads weights only: a student whose tokenizer differs (same shape,
    other merges) must be loaded by a new engine, or it would answer in the old one's ids."""
    from lion_ray.models import fits_in_place

    shape = dict(hidden_size=32, num_layers=1, num_heads=1, intermediate_size=64, vocab_size=300)
    texts = ["the theory of the thing"] * 50
    paths = {}
    for name, cfg, corpus in [
        ("a", TinyStudentConfig(**shape), texts),
        ("a_again", TinyStudentConfig(**shape, seed=7), texts),  # new weights: a new round
        ("other_merges", TinyStudentConfig(**shape), ["reverse the letters"] * 50),
        ("wider", TinyStudentConfig(**shape | {"hidden_size": 64}), texts),
    ]:
        paths[name] = str(tmp_path / name)
        init_student(paths[name], cfg, corpus)
    assert fits_in_place(paths["a"], paths["a_again"])
    assert not fits_in_place(paths["a"], paths["other_merges"])
    assert not fits_in_place(paths["a"], paths["wider"])


def _resave_like_another_version(model_dir: str) -> None:
    """Rewrite a tokenizer's files as another transformers version saves the same tokenizer:
    another class name, keys it adds, merges as pairs, an empty normalizer spelled out."""
    import json
    from pathlib import Path

    config_path = Path(model_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config |= {"tokenizer_class": "PreTrainedTokenizerFast", "legacy": False, "extra_ids": 0}
    config_path.write_text(json.dumps(config, indent=4))
    tok_path = Path(model_dir) / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    tok["normalizer"] = {"type": "Sequence", "normalizers": []}
    merges = tok["model"]["merges"]
    tok["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in merges]
    tok_path.write_text(json.dumps(tok, indent=1))


def test_a_tokenizer_saved_in_another_format_still_fits_in_place(tmp_path):
    """Training saves the tokenizer again; with another transformers version the files
    differ from a hub-style base though the tokenizer is the same, and round 1's move would
    always have started a new engine. Tokenizers are compared by what they do."""
    from lion_ray.models import copy_tokenizer, fits_in_place, same_tokenizer

    shape = dict(hidden_size=32, num_layers=1, num_heads=1, intermediate_size=64, vocab_size=300)
    texts = ["the theory of the thing"] * 50
    base, trained, other = (str(tmp_path / n) for n in ("base", "trained", "other"))
    init_student(base, TinyStudentConfig(**shape), texts)
    init_student(trained, TinyStudentConfig(**shape, seed=7), texts)
    init_student(other, TinyStudentConfig(**shape, seed=7), ["reverse the letters"] * 50)
    _resave_like_another_version(base)
    files = {n: (tmp_path / n / "tokenizer.json").read_bytes() for n in ("base", "trained")}
    assert files["base"] != files["trained"]
    assert same_tokenizer(base, trained) and fits_in_place(base, trained)
    assert not same_tokenizer(base, other) and not fits_in_place(base, other)
    # an export carries its base's files unchanged
    export = tmp_path / "export"
    export.mkdir()
    assert copy_tokenizer(base, str(export))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (export / name).read_bytes() == (tmp_path / "base" / name).read_bytes()
