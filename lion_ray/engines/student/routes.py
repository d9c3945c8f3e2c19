"""The student's HTTP routes and its Serve deployment, a thin shell around ``Replica``.

Routes: ``/v1/chat/completions`` (the conversation through the student's own prompt format:
its chat template with system messages, history and content parts, or the text template it
trained on) and ``/v1/completions`` (the prompt as an instruction); SSE streaming or not,
``/v1/models``, ``/v1/admin/reload`` and ``/v1/admin/status`` (admin keys only), and a chat
page at ``/``. Non-streaming requests to a batching backend (hf) are batched dynamically
(``serve.batch``). The run's stages reach the same replicas through deployment handles
(``answer_rows``, ``loss_rows``, ``move_to``, ``sleep``).
"""

# No `from __future__ import annotations`: Serve re-wraps the route methods, and FastAPI
# would then fail to resolve string annotations such as `body: ChatRequest`.

import asyncio
import logging
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve

from lion_ray import storage
from lion_ray.config import ServeConfig, StudentConfig
from lion_ray.engines.cluster import process_tree_rss_mib
from lion_ray.engines.student.guard import (
    REPLICA,
    BodyLimit,
    check_admin,
    check_key,
    configure_replica,
    page,
)
from lion_ray.engines.student.loading import load_backend
from lion_ray.engines.student.replica import Replica
from lion_ray.engines.student.runs import engine_record, newest_model
from lion_ray.engines.student.wire import (
    SSE_DONE,
    ChatRequest,
    CompletionRequest,
    ServeError,
    error_body,
    sse,
    usage,
)
from lion_ray.errors import LionError
from lion_ray.logic.access import within

log = logging.getLogger("ray.serve")

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


# Helpers the routes call are defined above the class: `serve.ingress` pickles the app
# when the class is decorated, capturing only the globals that exist by then.
@serve.deployment
@serve.ingress(api)
class StudentServer:
    """One Serve replica: a ``Replica`` (the loaded student and its lifecycle) behind the
    routes, dynamic batching, and the methods the run's engine calls on every replica."""

    def __init__(self, settings: dict):
        serve_cfg = ServeConfig.model_validate(settings["serve"])
        student = StudentConfig.model_validate(settings["student"])
        self.settings = serve_cfg
        self.run_dir: str | None = settings.get("run_dir")
        configure_replica(serve_cfg, settings.get("access"))
        if REPLICA["access"].open:
            log.warning(
                "serving WITHOUT authentication: every /v1 route answers anyone who can reach "
                "%s:%s (set serve.api_keys_env)",
                serve_cfg.host,
                serve_cfg.port,
            )
        self._batched.set_max_batch_size(serve_cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(serve_cfg.batch_wait_ms / 1000)
        # the context a request can need, not the model's whole (vLLM sizes its KV cache by it)
        context = serve_cfg.max_prompt_tokens + serve_cfg.max_tokens_cap
        self.replica = Replica(
            serve_cfg,
            student,
            lambda model_dir: load_backend(model_dir, student, serve_cfg.backend, context),
            run_dir=self.run_dir,
        )
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
        self.replica.start(first, asleep=bool((self._restart_state or {}).get("asleep")))
        if self.run_dir and serve_cfg.watch_interval_s:
            self.replica.watch(asyncio.get_running_loop())

    # --- the run's engine (DeploymentHandle.broadcast and stage batches) ----------------

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls this on every replica when the app's user_config changes (an update in
        place): the model to serve, and whether to sleep. A failed swap fails the update."""
        if self._restart_state is not None:  # Serve's call as the replica starts
            user_config, self._restart_state = {**user_config, **self._restart_state}, None
        await self.replica.reconfigure(user_config)

    async def sleep(self) -> None:
        await self.replica.sleep()

    async def swap_report(self) -> dict:
        import ray

        return self.replica.swap_report() | {"gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    async def move_to(self, model_dir: str) -> dict:
        await self.replica.move_to(model_dir)
        return await self.swap_report()

    async def answer_rows(self, rows: list[dict], model_dir: str | None = None) -> dict:
        return await self.replica.answer_rows(rows, model_dir)

    async def loss_rows(
        self, rows: list[dict], model_dir: str | None = None, max_length: int | None = None
    ) -> dict:
        return await self.replica.loss_rows(rows, model_dir, max_length)

    def check_health(self) -> None:
        self.replica.check_health()

    # --- generation -------------------------------------------------------------------

    async def _answer(self, job: tuple) -> dict:
        """One request: through dynamic batching where the backend gains from it (hf),
        straight to the engine where it batches continuously (vLLM)."""
        model = self.replica.model
        if model is not None and model.batches_requests:
            return await self._batched(job)
        return (await self.replica.generate_jobs([job]))[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list[tuple]) -> list[dict]:
        return await self.replica.generate_jobs(jobs)

    # --- routes -----------------------------------------------------------------------

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> str:
        return page()

    @api.get("/v1/models", dependencies=[Depends(check_key)])
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.settings.model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "lion-ray",
                    "root": self.replica.model_dir,
                }
            ],
        }

    @api.get("/v1/admin/status", dependencies=[Depends(check_admin)])
    async def status(self) -> dict:
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],  # which of the node's GPUs
        } | (self.replica.status() | {"rss_mb": process_tree_rss_mib()})

    @api.post("/v1/admin/reload", dependencies=[Depends(check_admin)])
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
        replica = self.replica
        try:
            swapped = await replica.swap_to(target)
        except Exception as exc:
            raise ServeError(
                500,
                f"swap to {target} failed ({type(exc).__name__}: {exc}); still serving "
                f"{replica.model_dir}",
                "server_error",
                "swap_failed",
            ) from None
        return {
            "model_dir": replica.model_dir,
            "swapped": swapped,
            "swaps": replica.swaps,
            "swap": replica.last_swap,
        }

    @api.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(self, body: ChatRequest):
        replica = self.replica
        replica.available()  # before a stream starts: a refusal must be a 503, not a cut stream
        try:  # the whole conversation, through the student's own format
            ids = replica.model.format.conversation_ids([m.model_dump() for m in body.messages])
        except LionError as exc:
            raise ServeError(400, str(exc), param="messages") from None
        prompt, max_tokens = replica.prepare(ids, body.max_completion_tokens or body.max_tokens)
        rid, created, name = (
            f"chatcmpl-{uuid.uuid4().hex[:24]}",
            int(time.time()),
            self.settings.model_name,
        )
        job = (prompt, max_tokens, body.temperature, body.top_p, body.seed)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                self._chat_events(job, rid, created, name, include_usage),
                media_type="text/event-stream",
            )
        r = await self._answer(job)
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
            "usage": usage(r),
        }

    async def _chat_events(self, job, rid, created, name, include_usage):
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name}

        def chunk(delta: dict, finish: str | None) -> str:
            return sse(base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        yield chunk({"role": "assistant", "content": ""}, None)
        async for item in self.replica.stream(*job):
            if "delta" in item:
                yield chunk({"content": item["delta"]}, None)
            else:
                yield chunk({}, item["finish"]["finish_reason"])
                if include_usage:
                    yield sse(base | {"choices": [], "usage": usage(item["finish"])})
        yield SSE_DONE

    @api.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(self, body: CompletionRequest):
        replica = self.replica
        replica.available()
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ServeError(400, "prompt must not be empty", param="prompt")
        prepared = [
            replica.prepare(replica.model.format.prompt_ids(p, ""), body.max_tokens)
            for p in prompts
        ]
        rid, created, name = (
            f"cmpl-{uuid.uuid4().hex[:24]}",
            int(time.time()),
            self.settings.model_name,
        )
        jobs = [(p, m, body.temperature, body.top_p, body.seed) for p, m in prepared]
        if body.stream:
            if len(jobs) > 1:
                raise ServeError(400, "streaming supports one prompt per request", param="prompt")
            return StreamingResponse(
                self._completion_events(jobs[0], rid, created, name),
                media_type="text/event-stream",
            )
        results = await asyncio.gather(*(self._answer(job) for job in jobs))
        totals = {
            k: sum(usage(r)[k] for r in results)
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
            "usage": totals,
        }

    async def _completion_events(self, job, rid, created, name):
        base = {"id": rid, "object": "text_completion", "created": created, "model": name}

        def chunk(text: str, finish: str | None) -> str:
            return sse(base | {"choices": [{"index": 0, "text": text, "finish_reason": finish}]})

        async for item in self.replica.stream(*job):
            if "delta" in item:
                yield chunk(item["delta"], None)
            else:
                yield chunk("", item["finish"]["finish_reason"])
        yield SSE_DONE
