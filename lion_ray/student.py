"""The tiny student: a Llama- or Qwen2-architecture model built from a config, with a
tokenizer trained on local text (and, if asked, a chat template). Nothing is downloaded.

    lion-ray student init --out runs/tiny-student

The tokenizer is byte-level BPE: the 256 byte symbols are always in the vocabulary (no
unknown tokens, any language), and ``vocab_size - 260`` merges are learned from the local
corpus. The default, 260, is character level, which suits the sandbox's character tasks
(reverse, sort, shift) that a tiny model can only learn when it sees single characters.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable

from lion_ray import storage
from lion_ray.config import TinyStudentConfig
from lion_ray.logic.prompts import build_prompt

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# Chat templates for tiny students, in the style of the model families they stand in for.
CHAT_TEMPLATES = {
    "chatml": {  # Qwen2-style
        "template": (
            "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
            "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        ),
        "special": ["<|im_start|>", "<|im_end|>"],
        "bos": "<s>",
        "eos": "<|im_end|>",
    },
    "llama3": {  # Llama-3-style: the template writes the BOS
        "template": (
            "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + "
            "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
            "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
        ),
        "special": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
    },
}


def default_corpus(n_tasks: int = 2000, seed: int = 0) -> list[str]:
    """Local text for the tokenizer: sandbox tasks in both templates, with their answers."""
    from lion_ray.sandbox.tasks import generate_tasks

    texts = []
    for task in generate_tasks(n_tasks, seed=seed, max_difficulty=5):
        for template in ("alpaca", "compact"):
            texts.append(build_prompt(task.instruction, "", template) + task.answer)
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int = 260, chat_template: str = "none"):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped for transformers (with a
    chat template and its special tokens when asked)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    chat = CHAT_TEMPLATES.get(chat_template)
    specials = SPECIAL_TOKENS + (chat["special"] if chat else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token=chat["bos"] if chat else "<s>",
        eos_token=chat["eos"] if chat else "</s>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    if chat:
        wrapped.chat_template = chat["template"]
    return wrapped


def build_tiny_student(cfg: TinyStudentConfig, texts: Iterable[str] | None = None):
    """(model, tokenizer) for a freshly initialised tiny Llama or Qwen2."""
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tokenizer = train_tokenizer(
        texts if texts is not None else default_corpus(), cfg.vocab_size, cfg.chat_template
    )
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(cfg.seed)
    if cfg.architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, use_sliding_window=False))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.to(getattr(torch, cfg.dtype)), tokenizer


def init_student(out_uri: str, cfg: TinyStudentConfig, texts: Iterable[str] | None = None) -> dict:
    """Build the tiny student and save it in Hugging Face format (safetensors) at ``out_uri``.

    Written to a temporary directory first and copied when complete, so ``out_uri`` never
    holds half a model.
    """
    model, tokenizer = build_tiny_student(cfg, texts)
    with tempfile.TemporaryDirectory(prefix="lion-student-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        storage.write_checksums(tmp)
        storage.publish_dir(tmp, out_uri)
    return {"path": out_uri, "parameters": count_parameters(model), "vocab_size": len(tokenizer)}


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
