"""Test helpers that are not fixtures."""

from __future__ import annotations

from pathlib import Path


def memorize(
    model_dir: Path, pairs: list[tuple[str, str]], template: str = "compact", steps: int = 150
) -> None:
    """Teach a tiny student to answer ``pairs`` exactly (plain torch, in-process, ~seconds)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lion_ray.logic.examples import encode_example, pad_batch, unpacked
    from lion_ray.logic.prompts import build_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    examples = [
        encode_example(
            lambda t: tok(t, add_special_tokens=False).input_ids,
            build_prompt(i, "", template),
            a,
            tok.eos_token_id,
            256,
        )
        for i, a in pairs
    ]
    batch = {k: torch.tensor(v) for k, v in pad_batch(unpacked(examples), tok.pad_token_id).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(
            input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"]
        ).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(model_dir)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
