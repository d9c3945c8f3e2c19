"""Token estimates and cost: the same arithmetic on the client (rate limiter, budget) and in
the sandbox server (its own limits and ``usage``), so the two agree."""

from __future__ import annotations

import math

CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text with BPE tokenizers
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators per chat message


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN)) if text else 0


def estimate_prompt_tokens(messages: list[dict]) -> int:
    return sum(MESSAGE_OVERHEAD_TOKENS + estimate_tokens(m.get("content") or "") for m in messages)


def cost_usd(
    prompt_tokens: int, completion_tokens: int, price_in_1k: float, price_out_1k: float
) -> float:
    return prompt_tokens / 1000 * price_in_1k + completion_tokens / 1000 * price_out_1k
