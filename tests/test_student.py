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
