"""In-process stand-ins for engines, for testing the algorithms in milliseconds."""

from __future__ import annotations

import json
from dataclasses import replace

from lion_ray.logic.accounting import estimate_prompt_tokens, estimate_tokens
from lion_ray.logic.chat import ChatRequest, ChatResult
from lion_ray.sandbox import world


class WorldClient:
    """A ``ChatClient`` answering from the sandbox world's pure functions (the same texts the
    HTTP sandbox gives), with a response cache keyed like the real engine's: the same
    messages and seed are answered from it."""

    def __init__(
        self,
        role: str = "sandbox",
        options: world.WorldOptions | None = None,
        max_tokens: int | None = None,
    ):
        self.role = role
        self.max_tokens = max_tokens  # cut replies off past it, as the sandbox server does
        self.model = "sandbox"
        self.options = options or world.WorldOptions()
        self.cache: dict[str, ChatResult] = {}
        self.asked: list[list[ChatRequest]] = []  # one list per ask() call (a wave)
        self.hits: list[int] = []  # per wave: requests answered from the cache

    def ask(self, requests: list[ChatRequest], label: str = "") -> list[ChatResult]:
        self.asked.append(list(requests))
        self.hits.append(0)
        out = []
        for r in requests:
            key = json.dumps([r.messages, r.seed])
            if key in self.cache:
                self.hits[-1] += 1
                out.append(replace(self.cache[key], request_id=r.request_id, cached=True))
                continue
            _, text = world.reply(r.messages, r.seed, self.options, r.response_format)
            finish = "stop"
            if self.max_tokens and estimate_tokens(text) > self.max_tokens:
                text, finish = text[: self.max_tokens * 4], "length"
            res = ChatResult(
                request_id=r.request_id,
                text=text,
                finish_reason=finish,
                attempts=1,
                prompt_tokens=estimate_prompt_tokens(r.messages),
                completion_tokens=estimate_tokens(text),
            )
            self.cache[key] = res
            out.append(res)
        return out
