"""Teacher, referee and generator calls at the provider's rate limit.

    results, summary = run_chat_requests(requests, endpoint, role="teacher", cache_dir=...)

``requests`` is a table of (request_id, messages as JSON, seed). The driver first answers
every request it finds in the durable cache, then streams the rest through a Ray Data
pool of ``ApiWorker`` actors; each holds an async OpenAI client with up to
``endpoint.concurrency`` requests in flight and asks one cluster-wide ``LimiterActor``
when to send. Every row comes back exactly once: ``ok``, ``failed`` (with the last error,
after the configured retries) or ``budget`` (not sent: the spending cap was reached).

``ChatCaller`` holds the per-request logic (reserve, send, retry, cache) as a plain class,
so it is tested without Ray; ``ApiWorker`` is the thin actor shell around it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass

import pyarrow as pa

from lion_ray.config import EndpointConfig
from lion_ray.engines import cache as response_cache
from lion_ray.errors import LionError
from lion_ray.logic.accounting import cost_usd, estimate_prompt_tokens

REQUEST_SCHEMA = pa.schema(
    [("request_id", pa.string()), ("messages", pa.string()), ("seed", pa.int64())]
)
RESULT_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("status", pa.string()),  # ok | failed | budget
        ("error", pa.string()),
        ("attempts", pa.int32()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        ("cached", pa.bool_()),
        ("latency_s", pa.float64()),
    ]
)


class FatalApiError(LionError):
    """An error that retrying cannot fix (bad key, unknown model or URL): stop the stage."""


class BudgetExceeded(LionError):
    """The endpoint's spending cap was reached; what was done is kept in the cache."""


def make_requests(rows: list[tuple[str, list[dict], int | None]]) -> pa.Table:
    """A request table from (request_id, messages, seed) triples."""
    return pa.Table.from_pylist(
        [
            {"request_id": rid, "messages": json.dumps(msgs, ensure_ascii=False), "seed": seed}
            for rid, msgs, seed in rows
        ],
        schema=REQUEST_SCHEMA,
    )


def sampling_params(endpoint: EndpointConfig, seed: int | None) -> dict:
    return {
        "temperature": endpoint.temperature,
        "top_p": endpoint.top_p,
        "max_tokens": endpoint.max_tokens,
        "seed": seed,
    }


def api_key(endpoint: EndpointConfig) -> str:
    """The endpoint's key from its environment variable (never from the config)."""
    if not endpoint.api_key_env:
        return "none"
    value = os.environ.get(endpoint.api_key_env, "")
    if not value:
        raise FatalApiError(
            f"environment variable {endpoint.api_key_env} is not set or empty; export the API key "
            f"for {endpoint.base_url} in it (or change api_key_env)"
        )
    return value


def _headers_of(response) -> dict[str, str]:
    headers = getattr(response, "headers", None) or {}
    return {
        k.lower(): v
        for k, v in headers.items()
        if k.lower().startswith(("x-ratelimit", "retry-after"))
    }


def _retry_after(headers: dict[str, str]) -> float | None:
    if "retry-after-ms" in headers:
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    try:
        return float(headers["retry-after"]) if "retry-after" in headers else None
    except ValueError:
        return None


@dataclass
class CallResult:
    text: str = ""
    finish_reason: str = ""
    status: str = "ok"
    error: str = ""
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False
    latency_s: float = 0.0


class ChatCaller:
    """Sends one chat request at a time per coroutine: reserve a send time from the
    limiter, send, retry with backoff (honouring Retry-After), cache the success.

    ``limiter`` needs async ``reserve(tokens, cost)`` and ``report(reserved, actual,
    headers, retry_after)``; ``client`` is an ``openai.AsyncOpenAI``.
    """

    def __init__(
        self,
        endpoint: EndpointConfig,
        client,
        limiter,
        writer: response_cache.CacheWriter | None,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
    ):
        self.endpoint = endpoint
        self.client = client
        self.limiter = limiter
        self.writer = writer
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # exponential, with jitter

    async def call(self, messages: list[dict], seed: int | None) -> CallResult:
        import openai

        ep = self.endpoint
        params = sampling_params(ep, seed)
        prompt_estimate = estimate_prompt_tokens(messages)
        tokens = prompt_estimate + ep.max_tokens
        worst_cost = cost_usd(
            prompt_estimate, ep.max_tokens, ep.price_per_1k_input, ep.price_per_1k_output
        )
        result = CallResult()
        started = time.monotonic()
        for attempt in range(ep.max_retries + 1):
            result.attempts = attempt + 1
            delay = await self.limiter.reserve(tokens, worst_cost)
            if delay < 0:
                result.status, result.error = (
                    "budget",
                    "not sent: the endpoint's budget_usd was reached",
                )
                break
            if delay:
                await asyncio.sleep(delay)
            headers: dict[str, str] = {}
            retry_after = None
            actual_cost = 0.0
            try:
                raw = await self.client.chat.completions.with_raw_response.create(
                    model=ep.model,
                    messages=messages,
                    **{k: v for k, v in params.items() if v is not None},
                )
                headers = _headers_of(raw)
                completion = raw.parse()
                choice = completion.choices[0]
                usage = completion.usage
                result.text = choice.message.content or ""
                result.finish_reason = choice.finish_reason or ""
                result.prompt_tokens = usage.prompt_tokens if usage else prompt_estimate
                result.completion_tokens = usage.completion_tokens if usage else 0
                actual_cost = cost_usd(
                    result.prompt_tokens,
                    result.completion_tokens,
                    ep.price_per_1k_input,
                    ep.price_per_1k_output,
                )
                result.cost_usd, result.status, result.error = actual_cost, "ok", ""
            except (
                openai.AuthenticationError,
                openai.PermissionDeniedError,
                openai.NotFoundError,
            ) as exc:
                await self.limiter.report(worst_cost, 0.0, None, None)
                raise FatalApiError(
                    f"{ep.base_url} refused the request ({exc.status_code}): {_short(exc)}; check the API "
                    f"key in ${ep.api_key_env or '(none)'}, the model name '{ep.model}' and base_url"
                ) from None
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                result.status, result.error = "failed", f"{exc.status_code}: {_short(exc)}"
                await self.limiter.report(worst_cost, 0.0, _headers_of(exc.response), None)
                break  # the same request would be refused again
            except openai.APIStatusError as exc:
                headers = _headers_of(exc.response)
                if exc.status_code == 429:
                    retry_after = _retry_after(headers)
                result.status, result.error = "failed", f"{exc.status_code}: {_short(exc)}"
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                result.status, result.error = "failed", f"{type(exc).__name__}: {_short(exc)}"
            await self.limiter.report(worst_cost, actual_cost, headers or None, retry_after)
            if result.status == "ok":
                if self.writer is not None:
                    self.writer.add(
                        {
                            "key": response_cache.cache_key(ep.model, params, messages),
                            "text": result.text,
                            "finish_reason": result.finish_reason,
                            "prompt_tokens": result.prompt_tokens,
                            "completion_tokens": result.completion_tokens,
                            "cost_usd": result.cost_usd,
                        }
                    )
                break
            if attempt < ep.max_retries:
                await asyncio.sleep(retry_after if retry_after else self._backoff(attempt))
        result.latency_s = time.monotonic() - started
        return result


def _short(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])[:300]
    return str(exc)[:300]


class _ActorLimiter:
    """Adapts a ``LimiterActor`` handle to the awaitable interface ``ChatCaller`` uses."""

    def __init__(self, handle):
        self.handle = handle

    async def reserve(self, tokens: int, cost: float) -> float:
        return await self.handle.reserve.remote(tokens, cost)

    async def report(self, reserved, actual, headers, retry_after) -> None:
        self.handle.report.remote(reserved, actual, headers, retry_after)  # fire and forget


class ApiWorker:
    """Ray Data actor: one async OpenAI client, ``concurrency`` requests in flight."""

    def __init__(self, endpoint: dict, limiter, cache_dir: str, flush_s: float = 1.0):
        self.endpoint = EndpointConfig.model_validate(endpoint)
        self.limiter = _ActorLimiter(limiter)
        self.writer = response_cache.CacheWriter(cache_dir, flush_s)
        self.caller: ChatCaller | None = None
        self.semaphore: asyncio.Semaphore | None = None

    def _setup(self) -> None:  # inside the actor's event loop
        from openai import AsyncOpenAI

        ep = self.endpoint
        client = AsyncOpenAI(
            base_url=ep.base_url, api_key=api_key(ep), max_retries=0, timeout=ep.timeout_s
        )
        self.caller = ChatCaller(ep, client, self.limiter, self.writer)
        self.semaphore = asyncio.Semaphore(ep.concurrency)

    async def _one(self, messages_json: str, seed) -> CallResult:
        async with self.semaphore:
            return await self.caller.call(
                json.loads(messages_json), None if seed is None else int(seed)
            )

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self.caller is None:
            self._setup()
        rows = batch.to_pylist()
        results = await asyncio.gather(*(self._one(r["messages"], r["seed"]) for r in rows))
        self.writer.flush()
        out = [
            {"request_id": r["request_id"], **res.__dict__}
            for r, res in zip(rows, results, strict=True)
        ]
        return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)


def preflight(endpoint: EndpointConfig, role: str) -> None:
    """Fail in seconds, not after a whole pool of retries: key present, URL reachable, key valid."""
    import openai

    try:
        key = api_key(endpoint)
    except FatalApiError as exc:
        raise FatalApiError(f"{role}: {exc}") from None
    client = openai.OpenAI(
        base_url=endpoint.base_url,
        api_key=key,
        max_retries=1,
        timeout=min(15.0, endpoint.timeout_s),
    )
    try:
        client.models.list()
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        raise FatalApiError(
            f"{role}: {endpoint.base_url} rejected the API key from ${endpoint.api_key_env} "
            f"({exc.status_code}); set a valid key in that variable"
        ) from None
    except openai.APIConnectionError as exc:
        raise FatalApiError(
            f"{role}: cannot reach {endpoint.base_url} ({type(exc).__name__}: {exc.__cause__ or exc}); "
            f"check {role}.base_url and that the server is up"
        ) from None
    except openai.APIStatusError:
        pass  # some providers have no /models; the first real request will tell
    finally:
        client.close()


def summarize(results: pa.Table, endpoint: EndpointConfig) -> dict:
    rows = results.to_pylist()
    live = [r for r in rows if not r["cached"]]
    return {
        "rows": len(rows),
        "ok": sum(r["status"] == "ok" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "budget": sum(r["status"] == "budget" for r in rows),
        "cached": len(rows) - len(live),
        "requests": sum(r["attempts"] for r in live),
        "prompt_tokens": sum(r["prompt_tokens"] for r in live if r["status"] == "ok"),
        "completion_tokens": sum(r["completion_tokens"] for r in live if r["status"] == "ok"),
        "cost_usd": round(sum(r["cost_usd"] for r in live), 6),
        "model": endpoint.model,
    }


def merge_summaries(*summaries: dict) -> dict:
    """API accounting of several engine runs added up."""
    total: dict = {}
    for s in summaries:
        for k, v in s.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
            else:
                total.setdefault(k, v)
    if "cost_usd" in total:
        total["cost_usd"] = round(total["cost_usd"], 6)
    return total


def _from_cache(entry: dict) -> dict:
    return {
        "text": entry["text"],
        "finish_reason": entry.get("finish_reason", "stop"),
        "status": "ok",
        "error": "",
        "attempts": 0,
        "prompt_tokens": entry.get("prompt_tokens", 0),
        "completion_tokens": entry.get("completion_tokens", 0),
        "cost_usd": 0.0,  # paid for once, in the run that made the call
        "cached": True,
        "latency_s": 0.0,
    }


def run_chat_requests(
    requests: pa.Table,
    endpoint: EndpointConfig,
    *,
    role: str,
    cache_dir: str,
    spent_usd: float = 0.0,
    progress_label: str | None = None,
    flush_s: float = 1.0,
    show_progress: bool = True,
) -> tuple[pa.Table, dict]:
    """Answer every request (cache first, then the endpoint); one result row per request.

    Raises ``BudgetExceeded`` (after returning nothing: the work done is in the cache) when the
    endpoint's ``budget_usd`` stopped the stage, and ``FatalApiError`` on a bad key or URL.
    """
    import ray

    from lion_ray.engines.cluster import data_context_quiet
    from lion_ray.engines.limiter import LimiterActor
    from lion_ray.progress import StageProgress

    rows = requests.to_pylist()
    keys = {
        r["request_id"]: response_cache.cache_key(
            endpoint.model, sampling_params(endpoint, r["seed"]), json.loads(r["messages"])
        )
        for r in rows
    }
    hits = response_cache.load(cache_dir, keys.values())
    results: dict[str, dict] = {}
    misses = []
    for r in rows:
        entry = hits.get(keys[r["request_id"]])
        if entry is not None:
            results[r["request_id"]] = {"request_id": r["request_id"], **_from_cache(entry)}
        else:
            misses.append(r)

    label = progress_label or f"{role} calls"
    with StageProgress(label, total=len(rows), enabled=show_progress, unit="rows") as bar:
        bar.advance(len(results), cached=len(results))
        if misses:
            preflight(endpoint, role)
            limiter = LimiterActor.remote(
                rpm=endpoint.requests_per_minute,
                tpm=endpoint.tokens_per_minute,
                budget_usd=endpoint.budget_usd,
                spent_usd=spent_usd,
            )
            per_block = max(1, endpoint.concurrency)
            chunks = [
                pa.Table.from_pylist(misses[i : i + per_block], schema=REQUEST_SCHEMA)
                for i in range(0, len(misses), per_block)
            ]
            data_context_quiet()
            ds = ray.data.from_arrow(chunks).map_batches(
                ApiWorker,
                batch_format="pyarrow",
                batch_size=None,
                fn_constructor_kwargs={
                    "endpoint": endpoint.model_dump(),
                    "limiter": limiter,
                    "cache_dir": cache_dir,
                    "flush_s": flush_s,
                },
                compute=ray.data.ActorPoolStrategy(
                    size=endpoint.num_actors,
                    max_concurrent_calls_per_actor=4,
                    max_tasks_in_flight_per_actor=4,
                ),
                num_cpus=0.25,  # I/O bound: fractional CPUs keep 2-core machines from deadlocking
            )
            started = time.monotonic()
            sent = 0
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for row in batch.to_pylist():
                        results[row["request_id"]] = row
                        sent += 1
                        bar.advance(1, cost=row["cost_usd"], failed=row["status"] == "failed")
                    elapsed = max(1e-6, time.monotonic() - started)
                    bar.set_rate(sent / elapsed * 60)
            except Exception as exc:
                fatal = _find_fatal(exc)
                if fatal is not None:
                    raise fatal from None
                raise
            finally:
                ray.kill(limiter)
    table = pa.Table.from_pylist([results[r["request_id"]] for r in rows], schema=RESULT_SCHEMA)
    summary = summarize(table, endpoint)
    response_cache.compact(cache_dir)
    if summary["budget"]:
        raise BudgetExceeded(
            f"{role}: budget_usd ${endpoint.budget_usd} reached after {summary['ok']} of {summary['rows']} rows "
            f"(${spent_usd + summary['cost_usd']:.4f} spent in this run); the answers so far are cached in "
            f"{cache_dir}; raise {role}.budget_usd and rerun to continue"
        )
    return table, summary


def _find_fatal(exc: BaseException) -> FatalApiError | None:
    """Ray wraps a worker's exception; dig the FatalApiError out to show its message."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(e, FatalApiError):
            return e
        cause = getattr(e, "cause", None)
        stack.extend([e.__cause__, e.__context__, cause])
        if isinstance(cause, BaseException):
            stack.append(cause)
    text = str(exc)
    if "FatalApiError" in text:
        tail = text.split("FatalApiError: ", 1)[-1].strip().splitlines()[0]
        return FatalApiError(tail)
    return None
