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


class FakeFormat:
    """A prompt format over bytes: enough for the replica's prompt handling."""

    stop_ids = [0]

    def prompt_ids(self, instruction: str, input_text: str = "") -> list[int]:
        if instruction.startswith("!"):
            raise ValueError(f"cannot format {instruction!r}")
        return list((instruction + input_text).encode())

    def conversation_ids(self, messages: list[dict]) -> list[int]:
        return list("".join(m["content"] for m in messages).encode())


class FakeBackend:
    """A ``StudentBackend`` that answers with its model directory's name, in the same
    process: the replica's lifecycle (swaps, leases, sleep, failures) without an engine.
    ``gate``: a generate waits on it (a long request in flight)."""

    batches_requests = False

    def __init__(self, model_dir: str, loader: FakeLoader):
        self.model_dir = model_dir
        self.loader = loader
        self.format = FakeFormat()
        self.position_limit = 64
        self.inflight = 0
        self.closed = False
        self.asleep = False
        self.dead = False
        self.seeds: list = []

    async def generate(self, prompts, max_new_tokens, temperature, top_p, seeds):
        import asyncio

        self.seeds += list(seeds)
        await asyncio.to_thread(self.loader.gate.wait, 30)
        return [
            {
                "answer": f"{self.model_dir}:{len(p)}",
                "finish_reason": "stop",
                "prompt_tokens": len(p),
                "completion_tokens": 1,
            }
            for p in prompts
        ]

    async def stream(self, ids, max_new_tokens, temperature, top_p, seed=None):
        for word in (self.model_dir, ":", str(len(ids))):
            yield {"delta": word}
        yield {
            "finish": {"finish_reason": "stop", "prompt_tokens": len(ids), "completion_tokens": 3}
        }

    async def losses(self, items, max_length=None):
        return [float(min(len(a), max_length or 10**9)) for _, _, a in items]

    async def prepare_reload(self, model_dir: str):
        # one family per prefix: "a1" -> "a2" moves in place, "a1" -> "b1" needs a new engine
        return ("weights", model_dir) if model_dir[0] == self.model_dir[0] else None

    async def apply_reload(self, prepared) -> None:
        failure = self.loader.reload_failures.get(prepared[1])
        if failure is not None:
            raise failure
        self.model_dir = prepared[1]
        self.asleep = False

    async def sleep(self) -> None:
        self.asleep = True

    async def wake(self) -> None:
        self.asleep = False

    def healthy(self) -> bool:
        return not self.dead

    def close(self) -> None:
        self.closed = True


class FakeLoader:
    """The replica's ``load`` for fake backends: records what it loaded, fails where told
    (``failures``: model_dir -> exception, raised after the engine is built, as a vLLM
    engine whose prompt format fails would), and waits on ``load_gate`` (a slow load)."""

    def __init__(self):
        import threading

        self.loaded: list[str] = []
        self.failures: dict[str, Exception] = {}
        self.reload_failures: dict[str, Exception] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.load_gate = threading.Event()
        self.load_gate.set()
        self.half_built: list = []  # weakrefs to engines built by loads that failed
        self.alive_at_load: list[bool] = []  # was a failed engine still alive at each load?

    def __call__(self, model_dir: str) -> FakeBackend:
        import weakref

        self.load_gate.wait(30)
        self.alive_at_load.append(any(ref() is not None for ref in self.half_built))
        engine = FakeBackend(model_dir, self)
        if model_dir in self.failures:
            self.half_built.append(weakref.ref(engine))
            raise self.failures[model_dir]
        self.loaded.append(model_dir)
        return engine
