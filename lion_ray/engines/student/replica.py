"""One serving replica's student, and everything that happens to it: requests lease it, a
new round swaps in (in place, beside, or retiring the old engine first), training puts it to
sleep, a failed engine is reported so that Serve replaces the replica.

``Replica`` is a plain class over a ``StudentBackend``: the Serve deployment
(:mod:`lion_ray.engines.student.routes`) only wraps it, so its lifecycle is tested with a
fake backend in milliseconds. It runs on one asyncio loop (the replica's).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import asynccontextmanager

from lion_ray.config import ServeConfig, StudentConfig
from lion_ray.engines.student.backend import (
    StaleWeights,
    StudentBackend,
    TornWeights,
    fit_prompt,
)
from lion_ray.engines.student.rows import result_or_error, row_seed
from lion_ray.engines.student.runs import newest_model
from lion_ray.engines.student.wire import ServeError
from lion_ray.errors import LionError

log = logging.getLogger("ray.serve")

RETRY_AFTER_S = 5  # what a request refused during a retire-first swap is told to wait


class Replica:
    """A loaded student behind a lease: a swap never takes it from a request mid-answer."""

    def __init__(
        self,
        settings: ServeConfig,
        student: StudentConfig,
        load: Callable[[str], StudentBackend],
        *,
        run_dir: str | None = None,
    ):
        self.settings = settings
        self.student = student
        self.run_dir = run_dir
        self._load = load  # model_dir -> a loaded backend (blocking; run in a thread)
        self.model_dir: str | None = None
        self.model: StudentBackend | None = None
        self.swaps = 0
        self.last_swap: dict | None = None  # how the newest swap went: /v1/admin/status
        self.retiring = False  # a swap that retires the engine first: requests get 503
        self.asleep = False  # colocated training has the GPU: requests get 503
        self.dead = ""  # why this replica has no engine (check_health fails while it has none)
        self._open = asyncio.Event()  # cleared while weights are copied in place
        self._open.set()
        self._swap_lock = asyncio.Lock()

    def start(self, model_dir: str, asleep: bool = False) -> None:
        """Serve ``model_dir``; ``asleep``: training has the GPU, so load nothing until the
        replica wakes (a vLLM engine allocates weights and KV cache as it is built)."""
        self.model_dir = model_dir
        if asleep:
            self.asleep = True
        else:
            self.model = self._load(model_dir)

    # --- swaps ------------------------------------------------------------------------

    async def swap_to(self, model_dir: str) -> bool:
        """Serve ``model_dir`` from now on; False when it already is. Weights move into the
        running engine when they can (the same architecture: a new round); otherwise a new
        engine loads beside the old one (hf, vllm-cpu), or, where two cannot fit (vLLM on
        GPU), the old one retires first while requests get 503 with Retry-After. No request
        is dropped mid-answer. A failed swap raises, and /v1/admin/status shows it."""
        async with self._swap_lock:
            if model_dir == self.model_dir and (self.model is not None or self.asleep):
                return False  # (a replica that lost its engine loads it again)
            started, how = time.monotonic(), ""
            try:
                how = await self._move(model_dir)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                self.last_swap = {
                    "model_dir": model_dir,
                    "ok": False,
                    "how": how,
                    "error": error[:2000],
                    "serving": self.model_dir,
                    "at": time.time(),
                }
                log.error(
                    "swap to %s failed, still serving %s: %s", model_dir, self.model_dir, error
                )
                raise
            self.model_dir = model_dir
            self.asleep = False  # a move into a sleeping engine wakes it
            self.dead = ""
            self.swaps += 1
            self.last_swap = {
                "model_dir": model_dir,
                "ok": True,
                "how": how,
                "seconds": round(time.monotonic() - started, 2),
                "at": time.time(),
            }
            log.info("now serving %s (%s, %.1f s)", model_dir, how, self.last_swap["seconds"])
            return True

    async def _move(self, model_dir: str) -> str:
        if self.model is None:  # restarted asleep, or lost its engine: nothing to move from
            self.model = await asyncio.to_thread(self._load, model_dir)
            return "loaded"
        mode = self.settings.swap
        if mode == "auto":
            prepared = await self.model.prepare_reload(model_dir)
            if prepared is not None:
                try:
                    async with self._held_back():
                        await self.model.apply_reload(prepared)
                    return "in_place"
                except StaleWeights as exc:  # a new engine is the sure way to the new weights
                    log.warning("%s", exc)
                except TornWeights as exc:  # serve the old round again, from a clean engine
                    self.retiring = True
                    try:
                        await self._retire_now()
                        await self._reload_after_failure(self.model_dir, exc)
                    finally:
                        self.retiring = False
                    raise
            mode = "beside" if self._two_fit else "retire_first"
        if mode == "beside":
            fresh = await asyncio.to_thread(self._load, model_dir)
            old, self.model = self.model, fresh
            if old.inflight == 0:
                await asyncio.to_thread(self._retire, old)  # else its last request retires it
            return "beside"
        # retire first: hold new requests off (503), let in-flight ones finish, then swap
        self.retiring = True
        try:
            await self._drain(self.model)
            await self._retire_now()
            try:
                self.model = await asyncio.to_thread(self._load, model_dir)
            except Exception as exc:
                await self._reload_after_failure(self.model_dir, exc)  # keep serving
                raise
            return "retire_first"
        finally:
            self.retiring = False

    @property
    def _two_fit(self) -> bool:
        """Whether a second engine fits beside the first: not two vLLM engines on one GPU
        at the default memory share."""
        return self.settings.backend == "hf" or self.student.vllm_device == "cpu"

    async def _retire_now(self) -> None:
        old, self.model = self.model, None
        await asyncio.to_thread(self._retire, old)

    async def _reload_after_failure(self, old_dir: str, failure: BaseException) -> None:
        """After a new engine failed to load: free what the failed one holds, then serve
        ``old_dir`` again. The failure's traceback keeps the half-built engine (and its GPU
        memory) alive through its frames, so they are cleared first. If the old model does
        not load either, the replica has no engine: it reports unhealthy and Serve
        replaces it (on the round the run's engine last moved to)."""
        log.error(
            "loading a new engine failed:\n%s",
            "".join(traceback.format_exception(failure)).strip()[-4000:],
        )
        traceback.clear_frames(failure.__traceback__)
        self.model = None
        gc.collect()
        try:
            self.model = await asyncio.to_thread(self._load, old_dir)
        except Exception as again:
            self.dead = f"{type(again).__name__}: {again}"[:2000]
            traceback.clear_frames(again.__traceback__)
            gc.collect()
            log.error("the old model %s did not load again either: %s", old_dir, self.dead)

    async def _drain(self, model, timeout_s: float = 600.0) -> None:
        if model is None:  # a replica restarted asleep has nothing to drain
            return
        deadline = time.monotonic() + timeout_s
        while model.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if model.inflight:
            raise LionError(f"{model.inflight} requests still running after {timeout_s:.0f} s")

    @asynccontextmanager
    async def _held_back(self):
        """New requests wait (they are not refused) while weights are copied in place."""
        self._open.clear()
        try:
            await self._drain(self.model)
            yield
        finally:
            self._open.set()

    @staticmethod
    def _retire(model) -> None:
        """Free a swapped-out student once no request uses it any more."""
        if model is not None:
            model.close()
        gc.collect()

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine is gone (a failed swap that could not
        reload the old model, or a dead vLLM engine) fails it, and Serve replaces it. Asleep
        (training has the GPU) or mid-swap, having no engine is expected."""
        if self.retiring or self.asleep:
            return
        if self.model is None:
            raise RuntimeError(
                f"this replica has no engine ({self.dead or 'it did not load'}); Serve replaces it"
            )
        if not self.model.healthy():
            raise RuntimeError(f"the engine serving {self.model_dir} has died; Serve replaces it")

    # --- leases -----------------------------------------------------------------------

    def available(self) -> None:
        """Refuse (503, Retry-After) while there is no engine to answer with."""
        if self.model is None and not (self.retiring or self.asleep):
            raise ServeError(
                503,
                "this replica has lost its engine and is being replaced; retry shortly",
                "server_error",
                "model_unavailable",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        if self.retiring or self.asleep:
            raise ServeError(
                503,
                "the student is asleep while its next round trains; retry shortly"
                if self.asleep
                else "the student is being replaced by a newer one; retry in a few seconds",
                "server_error",
                "model_asleep" if self.asleep else "model_swapping",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    @asynccontextmanager
    async def lease(self):
        """The current student for one request; a swap does not take it away mid-request."""
        self.available()
        await self._open.wait()
        self.available()
        model = self.model
        model.inflight += 1
        try:
            yield model
        finally:
            model.inflight -= 1
            if model is not self.model and model.inflight == 0 and not self.retiring:
                await asyncio.to_thread(self._retire, model)

    # --- what the run's engine asks of every replica ----------------------------------

    async def reconfigure(self, user_config: dict) -> None:
        """Serve ``user_config["model_dir"]`` (else the run's newest round), awake; or sleep
        (``asleep``: student.colocate, while the next round trains). A failed swap raises."""
        if user_config.get("asleep"):
            await self.sleep()
            return
        target = user_config.get("model_dir") or (
            newest_model(self.run_dir) if self.run_dir else None
        )
        if target:
            await self.swap_to(target)
        if self.asleep:  # the same model as before it slept: wake it as it is
            async with self._swap_lock:
                if self.model is None:  # restarted asleep: its first load
                    self.model = await asyncio.to_thread(self._load, self.model_dir)
                else:
                    await self.model.wake()
                self.asleep = False

    async def move_to(self, model_dir: str) -> dict:
        """Serve ``model_dir`` from now on, awake (a colocated engine slept through
        training); how the move went. A failed move raises."""
        await self.reconfigure({"model_dir": model_dir})
        return self.swap_report()

    async def sleep(self) -> None:
        """Give the GPU to training (student.colocate): a vLLM engine drops its weights and
        KV cache (the next load brings the new ones); an hf model moves to host memory.
        Until the next load, requests get 503 with Retry-After."""
        async with self._swap_lock, self._held_back():
            self.asleep = True
            if self.model is not None:  # restarted asleep: nothing loaded
                await self.model.sleep()

    def swap_report(self) -> dict:
        """How the newest swap went, what this replica serves, and whether its model is in
        memory (a replica restarted asleep loads it when it wakes)."""
        return (self.last_swap or {}) | {
            "serving": self.model_dir,
            "asleep": self.asleep,
            "loaded": self.model is not None,
        }

    async def _serving(self, model_dir: str | None) -> None:
        """Before a stage's batch: serve ``model_dir``, awake, if this replica does not (a
        replica that Serve restarted since the round's move starts elsewhere)."""
        if model_dir and (model_dir != self.model_dir or self.asleep or self.model is None):
            await self.move_to(model_dir)

    async def answer_rows(self, rows: list[dict], model_dir: str | None = None) -> dict:
        """Student answers for pool rows (id, instruction, input) with the student's own
        decoding settings and a seed per row; a row that fails carries its error. Also when
        the engine was busy (t0, t1): the stage's model-compute time."""
        await self._serving(model_dir)
        s = self.student
        t0 = time.time()
        async with self.lease() as model:
            prompts: dict[int, list[int]] = {}
            outs: list = [None] * len(rows)
            for k, r in enumerate(rows):
                try:  # a long prompt loses its start, by the rule every path uses
                    ids = model.format.prompt_ids(r["instruction"], r["input"] or "")
                    prompts[k] = fit_prompt(ids, model.position_limit, s.max_new_tokens)
                except Exception as exc:
                    outs[k] = exc
            done = await model.generate(
                list(prompts.values()),
                s.max_new_tokens,
                s.temperature,
                s.top_p,
                [row_seed(s.seed, rows[k]["id"]) for k in prompts],
            )
            for k, out in zip(prompts, done, strict=True):
                outs[k] = out
        return {"outs": [result_or_error(o) for o in outs], "t0": t0, "t1": time.time()}

    async def loss_rows(
        self, rows: list[dict], model_dir: str | None = None, max_length: int | None = None
    ) -> dict:
        """The student's mean per-token loss on each row's ``answer``, on the tokens
        training learns at ``max_length`` (train.max_length; None and the error where
        scoring failed), and when the engine was busy."""
        await self._serving(model_dir)
        t0 = time.time()
        items = [(r["instruction"], r["input"] or "", r["answer"]) for r in rows]
        async with self.lease() as model:
            try:
                losses, error = await model.losses(items, max_length), ""
            except Exception as exc:
                losses, error = [None] * len(rows), f"{type(exc).__name__}: {str(exc)[:300]}"
        return {"losses": losses, "error": error, "t0": t0, "t1": time.time()}

    # --- what users ask (the HTTP routes) ---------------------------------------------

    def prepare(self, ids: list[int], max_tokens: int | None) -> tuple[list[int], int]:
        """Check a prompt (token ids in the student's format) and the answer's room."""
        s = self.settings
        if max_tokens and max_tokens > s.max_tokens_cap:
            raise ServeError(
                400,
                f"max_tokens {max_tokens} is above this server's cap of {s.max_tokens_cap}",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        n = len(ids)
        if n > s.max_prompt_tokens:
            raise ServeError(
                400,
                f"the prompt is {n} tokens; this server accepts at most {s.max_prompt_tokens}",
                param="messages",
                code="context_length_exceeded",
            )
        # The answer must fit in the model's context after the prompt (never cut the prompt).
        limit = self.model.position_limit
        room = limit - n
        if max_tokens and max_tokens > room:
            raise ServeError(
                400,
                f"this model's context is {limit} tokens: the prompt takes {n}, so max_tokens "
                f"may be at most {room}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if room < 1:
            raise ServeError(
                400,
                f"the prompt ({n} tokens) fills this model's context",
                param="messages",
                code="context_length_exceeded",
            )
        return ids, max_tokens or min(256, s.max_tokens_cap, room)

    async def generate_jobs(self, jobs: list[tuple]) -> list[dict]:
        """Requests (prompt ids, max_tokens, temperature, top_p, seed) on one lease, one
        generate per sampling setting; a request that failed raises."""
        async with self.lease() as model:
            out: list = [None] * len(jobs)
            groups: dict[tuple, list[int]] = {}
            for i, (_, max_tokens, temperature, top_p, _seed) in enumerate(jobs):
                groups.setdefault((max_tokens, temperature, top_p), []).append(i)
            for (max_tokens, temperature, top_p), idx in groups.items():
                results = await model.generate(
                    [jobs[i][0] for i in idx],
                    max_tokens,
                    temperature,
                    top_p,
                    [jobs[i][4] for i in idx],
                )
                for i, r in zip(idx, results, strict=True):
                    out[i] = r
        return [_raised(r) for r in out]

    async def stream(self, prompt, max_tokens, temperature, top_p, seed=None):
        """A request's text deltas, then its finish, on one lease."""
        async with self.lease() as model:
            async for item in model.stream(prompt, max_tokens, temperature, top_p, seed):
                yield item

    def status(self) -> dict:
        return {
            "model_dir": self.model_dir,
            "swaps": self.swaps,
            "last_swap": self.last_swap,
            "swapping": self.retiring,
            "inflight": self.model.inflight if self.model is not None else 0,  # being answered
            "asleep": self.asleep,  # colocated training has the GPU
            # False: restarted asleep, no engine to wake (one loads when woken), or lost; a
            # vLLM engine put to sleep stays loaded (its weights are freed, not the engine)
            "loaded": self.model is not None,
            "healthy": not self.dead,
            "backend": self.settings.backend,
        }

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Follow the run directory: swap to each newer round as it appears (a thread)."""

        def follow() -> None:
            failed = None  # a round whose swap failed is not retried until a newer one comes
            while True:
                time.sleep(self.settings.watch_interval_s)
                try:
                    newest = newest_model(self.run_dir)
                except Exception:  # a half-written manifest: look again later
                    continue
                if not newest or newest in (self.model_dir, failed):
                    continue
                try:
                    asyncio.run_coroutine_threadsafe(self.swap_to(newest), loop).result()
                except Exception:  # logged and shown in /v1/admin/status by swap_to
                    failed = newest

        threading.Thread(target=follow, daemon=True).start()


def _raised(result):
    if isinstance(result, BaseException):
        raise result
    return result
