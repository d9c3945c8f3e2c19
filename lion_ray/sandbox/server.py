"""The sandbox as an OpenAI-compatible HTTP server, with the provider's habits built in.

    lion-ray sandbox serve --host 127.0.0.1 --port 8765 --rpm 600 --error-rate 0.05

(`SandboxProcess` runs that command in a child process for tests, benchmarks and the demo.)

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (streaming and not, with
``response_format`` for the referee's JSON schema), the Batch API (``/v1/files``,
``/v1/batches``: see ``lion_ray.sandbox.batches``), ``GET /stats`` (counts of requests
served and rejected by reason), ``POST /stats/reset``, ``GET /health``.

Limits and faults, all optional: requests and tokens per minute answered with 429,
``Retry-After`` and ``x-ratelimit-*`` headers as OpenAI sends them; random 500/503; a
latency distribution; a fraction of slow responses (past a client's timeout); a fraction
of malformed referee reviews; a teacher error rate; a bearer key; and the errors real
providers send (``--fault``: out of credit, a refused parameter, dropped connections,
gateway errors).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lion_ray.logic.accounting import estimate_prompt_tokens, estimate_tokens
from lion_ray.sandbox import world
from lion_ray.sandbox.batches import BatchOptions, BatchService, add_batch_routes

MODELS = ("sandbox", "sandbox-teacher", "sandbox-referee", "sandbox-generator")
FAULTS = ("insufficient_quota", "bad_param", "reset", "gateway")


@dataclass
class ServerOptions:
    rpm: int | None = None
    tpm: int | None = None
    burst_s: float = 1.0  # limits are enforced over this window, as providers do (rpm/60 per s)
    error_rate: float = 0.0
    latency_ms: float = 0.0
    latency_sd_ms: float = 0.0
    slow_rate: float = 0.0
    slow_ms: float = 30_000.0
    malformed_rate: float = 0.0
    teacher_error_rate: float = 0.0
    api_key_env: str | None = None
    fault_seed: int | None = None
    # provider errors, each "name" or "name:rate": insufficient_quota (429, out of credit),
    # bad_param (400 for max_tokens or temperature, as reasoning models answer), reset
    # (connection dropped mid-response), gateway (502/504 from a proxy)
    faults: tuple[str, ...] = ()
    batch_delay_s: float = 1.0
    batch_fail_rate: float = 0.0  # lines failing the first time their custom_id is submitted
    batch_expire_rate: float = 0.0  # batches expiring with half their lines done

    def fault_rates(self) -> dict[str, float]:
        rates = {}
        for spec in self.faults:
            name, _, rate = spec.partition(":")
            if name not in FAULTS:
                raise ValueError(f"unknown fault {name!r}; use one of {', '.join(FAULTS)}")
            rates[name] = float(rate) if rate else 1.0
        return rates

    def world_options(self) -> world.WorldOptions:
        return world.WorldOptions(
            teacher_error_rate=self.teacher_error_rate, malformed_rate=self.malformed_rate
        )


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI writes ``x-ratelimit-reset-*``: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"


class TokenBucket:
    """``per_minute`` units refilled continuously, at most ``per_minute * burst_s / 60`` banked."""

    def __init__(self, per_minute: int, burst_s: float):
        self.limit = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, n: float, now: float) -> float:
        """Seconds until ``n`` units are available (0 when they are now)."""
        self._refill(now)
        need = min(n, self.capacity)  # a request bigger than the window needs a full bucket
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, n: float) -> None:
        self.level -= min(n, self.capacity)

    def headers(self, name: str) -> dict[str, str]:
        # in per-minute units like the limit; 0 whenever the next request would be refused
        remaining = math.floor(self.level / self.capacity * self.limit) if self.level >= 1 else 0
        return {
            f"x-ratelimit-limit-{name}": str(self.limit),
            f"x-ratelimit-remaining-{name}": str(remaining),
            f"x-ratelimit-reset-{name}": format_reset((self.capacity - self.level) / self.rate),
        }


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    counts: Counter = field(default_factory=Counter)
    served_by_kind: Counter = field(default_factory=Counter)
    accepted_times: deque = field(default_factory=deque)  # requests let past the limiter

    def snapshot(self, window_s: float = 60.0) -> dict[str, Any]:
        times = list(self.accepted_times)
        best, j = 0, 0
        for i, t in enumerate(times):
            while times[j] < t - window_s:
                j += 1
            best = max(best, i - j + 1)
        c = self.counts
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "requests": c["requests"],
            "served": c["served"],
            "served_by_kind": dict(self.served_by_kind),
            "rejected": {
                "rate_limit_requests": c["429_requests"],
                "rate_limit_tokens": c["429_tokens"],
                "server_error": c["5xx"],
                "bad_request": c["400"],
                "unauthorized": c["401"],
            },
            "rejected_429": c["429_requests"] + c["429_tokens"],
            "faults": {f: c[f"fault_{f}"] for f in FAULTS if c[f"fault_{f}"]},
            "batch": {
                k: c[f"batch_{k}"] if k != "batches_created" else c[k]
                for k in (
                    "batches_created",
                    "lines",
                    "lines_resubmitted_after_success",
                    "served",
                    "failed_lines",
                    "expired_lines",
                    "prompt_tokens",
                    "completion_tokens",
                )
            },
            "slow": c["slow"],
            "malformed": c["malformed"],
            "prompt_tokens": c["prompt_tokens"],
            "completion_tokens": c["completion_tokens"],
            "max_accepted_in_window": {"window_s": window_s, "requests": best},
            # (accepted - 1) / span is the rate the provider saw while traffic flowed
            "accepted_span_s": round(times[-1] - times[0], 6) if len(times) > 1 else 0.0,
        }


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[_Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    response_format: dict | None = None


def _error(
    status: int, message: str, type_: str, code: str | None = None, headers=None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(options: ServerOptions | None = None) -> FastAPI:
    opts = options or ServerOptions()
    app = FastAPI(title="lion-ray sandbox", docs_url=None, redoc_url=None)
    state = {
        "stats": Stats(),
        "req_bucket": TokenBucket(opts.rpm, opts.burst_s) if opts.rpm else None,
        "tok_bucket": TokenBucket(opts.tpm, opts.burst_s) if opts.tpm else None,
        "rng": random.Random(opts.fault_seed),
    }
    faults = opts.fault_rates()
    expected_key = os.environ.get(opts.api_key_env) if opts.api_key_env else None
    if opts.api_key_env and not expected_key:
        raise SystemExit(
            f"sandbox: --api-key-env {opts.api_key_env} is set but that variable is empty"
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        state["stats"].counts["400"] += 1
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return _error(400, f"Invalid request: {where}: {first['msg']}", "invalid_request_error")

    def _limit_headers() -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, bucket in (("requests", state["req_bucket"]), ("tokens", state["tok_bucket"])):
            if bucket:
                headers.update(bucket.headers(name))
        return headers

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return state["stats"].snapshot()

    @app.post("/stats/reset")
    async def reset_stats():
        state["stats"] = Stats()
        return {"status": "reset"}

    def _unauthorized(request: Request) -> JSONResponse | None:
        if expected_key is None:
            return None
        if request.headers.get("authorization", "") != f"Bearer {expected_key}":
            state["stats"].counts["401"] += 1
            return _error(
                401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            )
        return None

    @app.get("/v1/models")
    async def models(request: Request):
        if (denied := _unauthorized(request)) is not None:
            return denied
        now = int(time.time())
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": now, "owned_by": "lion-ray"} for m in MODELS
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest):
        st = state["stats"]
        st.counts["requests"] += 1
        if (denied := _unauthorized(request)) is not None:
            return denied
        messages = [m.model_dump() for m in body.messages]
        try:
            kind = world.classify(messages)
        except world.UnrecognisedRequest as exc:
            st.counts["400"] += 1
            return _error(
                400, f"Unrecognised request: {exc}", "invalid_request_error", "unrecognised_prompt"
            )

        refusal = _provider_fault(faults, body, state["rng"], st.counts)
        if refusal is not None:
            return refusal
        max_tokens = body.max_completion_tokens or body.max_tokens or 1024
        prompt_tokens = estimate_prompt_tokens(messages)
        now = time.monotonic()
        req_bucket, tok_bucket = state["req_bucket"], state["tok_bucket"]
        waits = {
            "requests": req_bucket.wait_for(1, now) if req_bucket else 0.0,
            "tokens": tok_bucket.wait_for(prompt_tokens + max_tokens, now) if tok_bucket else 0.0,
        }
        if any(waits.values()):
            which = max(waits, key=waits.get)
            st.counts[f"429_{which}"] += 1
            retry = max(waits.values())
            headers = _limit_headers() | {
                "retry-after": str(max(1, math.ceil(retry))),
                "retry-after-ms": str(max(1, math.ceil(retry * 1000))),
            }
            limit = (req_bucket if which == "requests" else tok_bucket).limit
            return _error(
                429,
                f"Rate limit reached for {body.model} on {which} per min: Limit {limit}. "
                f"Please try again in {format_reset(retry)}.",
                which,
                "rate_limit_exceeded",
                headers,
            )
        if req_bucket:
            req_bucket.take(1)
        if tok_bucket:
            tok_bucket.take(prompt_tokens + max_tokens)
        st.accepted_times.append(time.time())

        rng = state["rng"]
        delay = 0.0
        if opts.latency_ms:
            if opts.latency_sd_ms:  # lognormal with the given mean and standard deviation
                sigma2 = math.log(1 + (opts.latency_sd_ms / opts.latency_ms) ** 2)
                delay = rng.lognormvariate(
                    math.log(opts.latency_ms) - sigma2 / 2, math.sqrt(sigma2)
                )
            else:
                delay = opts.latency_ms
        if opts.slow_rate and rng.random() < opts.slow_rate:
            st.counts["slow"] += 1
            delay = opts.slow_ms
        if delay:
            await asyncio.sleep(delay / 1000)
        if opts.error_rate and rng.random() < opts.error_rate:
            st.counts["5xx"] += 1
            status = rng.choice([500, 503])
            return _error(
                status, "The server had an error while processing your request.", "server_error"
            )

        if faults.get("reset") and rng.random() < faults["reset"]:
            st.counts["fault_reset"] += 1
            return StreamingResponse(_dropped_connection(), media_type="application/json")
        _, text = world.reply(messages, body.seed, opts.world_options(), body.response_format)
        if kind == "referee" and "Score of the Assistant 2" not in text:
            st.counts["malformed"] += 1
        finish = "stop"
        if estimate_tokens(text) > max_tokens:
            text, finish = text[: max_tokens * 4], "length"
        completion_tokens = estimate_tokens(text)
        st.counts["served"] += 1
        st.served_by_kind[kind] += 1
        st.counts["prompt_tokens"] += prompt_tokens
        st.counts["completion_tokens"] += completion_tokens
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        headers = _limit_headers() | {"x-request-id": rid}
        if not body.stream:
            return JSONResponse(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": body.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": finish,
                        }
                    ],
                    "usage": usage,
                },
                headers=headers,
            )
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events():
            base = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
            }

            def chunk(delta: dict, finish_reason=None, **extra) -> str:
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
                return f"data: {json.dumps(base | {'choices': [choice]} | extra)}\n\n"

            yield chunk({"role": "assistant", "content": ""})
            for i in range(0, len(text), 8):
                yield chunk({"content": text[i : i + 8]})
                await asyncio.sleep(0)
            yield chunk({}, finish)
            if include_usage:
                yield f"data: {json.dumps(base | {'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    batches = BatchService(
        BatchOptions(opts.batch_delay_s, opts.batch_fail_rate, opts.batch_expire_rate),
        opts.world_options(),
        lambda: state["stats"].counts,
        state["rng"],
    )
    add_batch_routes(app, batches, _unauthorized)
    return app


def _provider_fault(faults: dict[str, float], body, rng, counts: Counter) -> JSONResponse | None:
    """The errors real providers send, as configured (``--fault``)."""
    if faults.get("insufficient_quota") and rng.random() < faults["insufficient_quota"]:
        counts["fault_insufficient_quota"] += 1
        return _error(
            429,
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        )
    if faults.get("bad_param") and rng.random() < faults["bad_param"]:
        # a reasoning model: max_completion_tokens only, and the default temperature only
        if body.max_tokens is not None:
            counts["fault_bad_param"] += 1
            return _error(
                400,
                "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                "'max_completion_tokens' instead.",
                "invalid_request_error",
                "unsupported_parameter",
            )
        if body.temperature not in (None, 1):
            counts["fault_bad_param"] += 1
            return _error(
                400,
                f"Unsupported value: 'temperature' does not support {body.temperature} with this "
                "model. Only the default (1) value is supported.",
                "invalid_request_error",
                "unsupported_value",
            )
    if faults.get("gateway") and rng.random() < faults["gateway"]:
        counts["fault_gateway"] += 1
        status = rng.choice([502, 504])
        return JSONResponse(
            {"error": {"message": f"{status} from the upstream proxy", "type": "server_error"}},
            status_code=status,
        )
    return None


class InjectedReset(ConnectionResetError):
    """The ``reset`` fault: not a bug, so the server's log leaves it out."""


async def _dropped_connection():
    """Headers go out, then the connection drops: the client sees a broken response."""
    raise InjectedReset("sandbox: connection reset by fault injection")
    yield b""  # pragma: no cover - makes this an async generator


def _not_injected(record) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], InjectedReset))


def run_server(options: ServerOptions, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve in the foreground. Prints ``LISTENING <base url>`` once the socket accepts."""
    app = create_app(options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    print(f"LISTENING http://{host}:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
    logging.getLogger("uvicorn.error").addFilter(_not_injected)
    uvicorn.Server(config).run(sockets=[sock])


def options_to_args(options: ServerOptions) -> list[str]:
    args = []
    for name, value in asdict(options).items():
        if name == "faults":
            for fault in value:
                args += ["--fault", fault]
        elif value is not None and value != getattr(ServerOptions(), name):
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class SandboxProcess:
    """The sandbox server in a child process on a free port (tests, the demo, benchmarks).

    It dies with its parent, even when the parent is killed with SIGKILL.
    """

    def __init__(
        self,
        options: ServerOptions | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        env: dict[str, str] | None = None,
    ):
        self.options = options or ServerOptions()
        self.host, self.port = host, port
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.url = ""

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self, timeout: float = 30.0) -> SandboxProcess:
        cmd = [
            sys.executable,
            "-m",
            "lion_ray",
            "sandbox",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        self.proc = subprocess.Popen(
            cmd + options_to_args(self.options),
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(self.env or {})},
            preexec_fn=_die_with_parent,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(
                f"sandbox server did not start within {timeout:.0f}s (said {line!r})"
            )
        self.url = line.split()[1]
        if self.host == "0.0.0.0":
            import ray.util

            self.url = self.url.replace("0.0.0.0", ray.util.get_node_ip_address())
        return self

    def _call(self, method: str, path: str) -> dict:
        req = urllib.request.Request(f"{self.url}{path}", method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict:
        return self._call("GET", "/stats")

    def reset_stats(self) -> None:
        self._call("POST", "/stats/reset")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
