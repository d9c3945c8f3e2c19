"""Teacher, referee and generator calls at the provider's rate limit.

    engine = ApiEngine(endpoint, role="teacher", cache_dir=run.cache_dir("teacher"),
                       ledger_dir=run.ledger_dir("teacher"))
    results = engine.ask([ChatRequest("id-1", messages)], label="teacher (Train Pool)")

An ``ApiEngine`` serves one endpoint for a whole run (every stage, every wave, every
re-ask) and implements the ``ChatClient`` interface the algorithms use. It answers what
its response cache already holds (the index is loaded once and appended to), and streams
the rest through the endpoint's resident ``ApiWorker`` actors; each holds an async OpenAI
client with up to ``endpoint.concurrency`` requests in flight and asks the endpoint's one
cluster-wide ``LimiterActor`` when to send. The limiter lives as long as the run and keeps
the schedule, ``Retry-After`` pauses, adapted limits and the budget, whose state is the
spend ledger in the run directory. Every request comes back exactly once: ``ok``,
``failed`` (with the last error, after the configured retries) or ``budget`` (not sent).

``ChatCaller`` holds the per-request logic (reserve, send, retry, cache) as a plain class,
so it is tested without Ray; ``ApiWorker`` is the thin actor shell around it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import random
import time
import uuid
from dataclasses import asdict, replace

import pyarrow as pa

from lion_ray.config import EndpointConfig
from lion_ray.engines import cache as response_cache
from lion_ray.engines.api_wire import (  # noqa: F401  (callers import them from here too)
    BudgetExceeded,
    FatalApiError,
    QuotaExhausted,
    api_key,
    request_body,
    request_key,
    request_params,
    worst_case,
)
from lion_ray.engines.plan import API_WORKER_CPUS, api_workers_request
from lion_ray.errors import LionError
from lion_ray.logic.accounting import cost_usd
from lion_ray.logic.chat import ChatRequest, ChatResult, usage

REQUEST_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("messages", pa.string()),
        ("seed", pa.int64()),
        ("response_format", pa.string()),
    ]
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


def _never_sent(exc: Exception) -> bool:
    """A connection that was never made cannot be billed; any other transport failure may
    have reached the provider, which may bill it."""
    import httpx2 as httpx  # the transport openai 3 uses

    return isinstance(exc.__cause__, httpx.ConnectError | httpx.ConnectTimeout)


def _error_code(exc) -> str:
    """The provider's error code ('insufficient_quota', 'unsupported_parameter', ...)."""
    code = getattr(exc, "code", None)
    body = getattr(exc, "body", None)
    if not code and isinstance(body, dict):
        code = body.get("code") or body.get("type")
    return str(code or "")


class ChatCaller:
    """Sends one chat request at a time per coroutine: reserve a send time from the
    limiter, send, retry with backoff (honouring Retry-After), cache the success.

    Errors are told apart the way providers send them: 429 with ``insufficient_quota`` (no
    credit: stop, do not retry), 401/403/404 (bad key, model or URL: stop), a 400 that
    ``stop_after_identical_errors`` requests in a row get before any succeeds (a parameter
    the model refuses: stop), any other 400/422 (that row fails), 429/5xx/timeouts and
    connection errors (retried with backoff).

    ``limiter`` needs async ``reserve(tokens, cost, request) -> (delay, ticket)``,
    ``report(ticket, reserved, actual, headers, retry_after)`` and ``give_up(request,
    reserved)``; ``client`` is an ``openai.AsyncOpenAI``.
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
        self.succeeded = 0
        self.same_refusal: tuple[str, int] = ("", 0)  # (error, times in a row)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # exponential, with jitter

    def _refused(self, error: str) -> None:
        """A 400 that every request gets is the request's shape, not one row: stop."""
        last, times = self.same_refusal
        self.same_refusal = (error, times + 1 if error == last else 1)
        limit = self.endpoint.stop_after_identical_errors
        if not self.succeeded and self.same_refusal[1] >= limit:
            raise FatalApiError(
                f"{self.endpoint.base_url} refused {limit} requests in a row with the same error "
                f"and none succeeded: {error}; check the model's parameters (token_param, "
                "temperature: null for reasoning models) and the request"
            )

    async def call(self, request: ChatRequest) -> ChatResult:
        import openai

        ep = self.endpoint
        body = request_body(ep, request)
        tokens, worst_cost = worst_case(ep, request.messages)
        result = ChatResult(request_id=request.request_id)
        started = time.monotonic()
        for attempt in range(ep.max_retries + 1):
            result.attempts = attempt + 1
            name = uuid.uuid4().hex  # this attempt, should its stage stop before it is sent
            try:
                delay, ticket = await self.limiter.reserve(tokens, worst_cost, name)
                if delay < 0:
                    result.status = "budget"
                    result.error = "not sent: the endpoint's budget_usd was reached"
                    break
                if delay:
                    await asyncio.sleep(delay)
            except asyncio.CancelledError:  # the stage stopped: this attempt is not sent
                self.limiter.give_up(name, worst_cost)
                raise
            headers: dict[str, str] = {}
            retry_after = None
            billed = 0.0
            try:
                raw = await self.client.chat.completions.with_raw_response.create(**body)
                headers = _headers_of(raw)
                completion = raw.parse()
                choice = completion.choices[0]
                used = completion.usage
                result.text = choice.message.content or ""
                result.finish_reason = choice.finish_reason or ""
                result.prompt_tokens = used.prompt_tokens if used else tokens - ep.max_tokens
                result.completion_tokens = used.completion_tokens if used else 0
                billed = cost_usd(
                    result.prompt_tokens,
                    result.completion_tokens,
                    ep.price_per_1k_input,
                    ep.price_per_1k_output,
                )
                result.status, result.error = "ok", ""
                self.succeeded += 1
            except (
                openai.AuthenticationError,
                openai.PermissionDeniedError,
                openai.NotFoundError,
            ) as exc:
                await self.limiter.report(ticket, worst_cost, 0.0, None, None)
                raise FatalApiError(
                    f"{ep.base_url} refused the request ({exc.status_code}): {_short(exc)}; check the API "
                    f"key in ${ep.api_key_env or '(none)'}, the model name '{ep.model}' and base_url"
                ) from None
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                result.status, result.error = "failed", f"{exc.status_code}: {_short(exc)}"
                await self.limiter.report(ticket, worst_cost, 0.0, _headers_of(exc.response), None)
                self._refused(result.error)
                break  # the same request would be refused again
            except openai.APIStatusError as exc:
                headers = _headers_of(exc.response)
                if exc.status_code == 429 and _error_code(exc) == "insufficient_quota":
                    await self.limiter.report(ticket, worst_cost, 0.0, None, None)
                    raise QuotaExhausted(
                        f"{ep.base_url}: the account is out of credit (429 insufficient_quota: "
                        f"{_short(exc)}); this is not a rate limit and retrying will not help: add "
                        "credit or change the key, then rerun (finished answers are cached)"
                    ) from None
                if exc.status_code == 429:
                    retry_after = _retry_after(headers)
                result.status, result.error = "failed", f"{exc.status_code}: {_short(exc)}"
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                result.status, result.error = "failed", f"{type(exc).__name__}: {_short(exc)}"
                # the provider may have answered (and billed) a request we stopped waiting for
                billed = 0.0 if _never_sent(exc) else worst_cost
            result.cost_usd += billed
            await self.limiter.report(ticket, worst_cost, billed, headers or None, retry_after)
            if result.status == "ok":
                if self.writer is not None:
                    self.writer.add(
                        {
                            "key": request_key(ep, request),
                            "text": result.text,
                            "finish_reason": result.finish_reason,
                            "prompt_tokens": result.prompt_tokens,
                            "completion_tokens": result.completion_tokens,
                            "cost_usd": billed,
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
    """Adapts a ``LimiterActor`` handle to the awaitable interface ``ChatCaller`` uses; the
    stage tag goes into the spend ledger with every reservation."""

    def __init__(self, handle, stage: str, ledger_dir: str | None):
        self.handle, self.stage, self.ledger_dir = handle, stage, ledger_dir

    async def reserve(
        self, tokens: int, cost: float, request: str | None = None
    ) -> tuple[float, str | None]:
        try:
            return await self.handle.reserve.remote(tokens, cost, self.stage, request)
        except Exception as exc:  # money fails closed: no durable reservation, no request
            raise FatalApiError(
                f"cannot record spend in the ledger {self.ledger_dir} ({type(exc).__name__}: "
                f"{str(exc)[-300:]}); a budget that cannot be checked stops the stage"
            ) from None

    def give_up(self, request: str, reserved: float) -> None:
        """Release the reservation of a request its caller stopped before sending (fire and
        forget: it runs in the limiter, after the caller's task is gone)."""
        self.handle.give_up.remote(request, reserved, self.stage)

    async def report(self, ticket, reserved, actual, headers, retry_after) -> None:
        # fire and forget: the reservation already covers the worst case
        self.handle.report.remote(ticket, reserved, actual, headers, retry_after, self.stage)


class ApiWorker:
    """One async OpenAI client with ``concurrency`` requests in flight: the plain class
    under the endpoint's resident worker actors (``ApiEngine.workers``), which live as long
    as the run and are handed chunks of requests by ``ask``."""

    def __init__(
        self,
        endpoint: dict,
        limiter,
        cache_dir: str,
        ledger_dir: str | None = None,
        stage: str = "",
        flush_s: float = 1.0,
    ):
        self.endpoint = EndpointConfig.model_validate(endpoint)
        self.limiter = _ActorLimiter(limiter, stage, ledger_dir)
        self.writer = response_cache.CacheWriter(cache_dir, flush_s)
        self.caller: ChatCaller | None = None
        self.semaphore: asyncio.Semaphore | None = None
        self.fatal: FatalApiError | None = None

    def _setup(self) -> None:  # inside the actor's event loop
        from openai import AsyncOpenAI

        if isinstance(self.limiter.handle, str):  # the endpoint's limiter, by its name
            import ray

            self.limiter.handle = ray.get_actor(self.limiter.handle, namespace="lion-ray")

        ep = self.endpoint
        client = AsyncOpenAI(
            base_url=ep.base_url, api_key=api_key(ep), max_retries=0, timeout=ep.timeout_s
        )
        self.caller = ChatCaller(ep, client, self.limiter, self.writer)
        self.semaphore = asyncio.Semaphore(ep.concurrency)

    async def _one(self, row: dict) -> ChatResult:
        request = ChatRequest(
            row["request_id"],
            json.loads(row["messages"]),
            None if row["seed"] is None else int(row["seed"]),
            json.loads(row["response_format"]) if row["response_format"] else None,
        )
        async with self.semaphore:
            if self.fatal is not None:  # another request learned the stage must stop
                raise self.fatal
            try:
                return await self.caller.call(request)
            except FatalApiError as exc:
                self.fatal = exc
                raise

    async def ask(self, batch: pa.Table, stage: str) -> tuple[pa.Table, float, float]:
        """Answer a chunk for ``stage`` (billed to it in the ledger): the results, and when
        the chunk started and finished (the stage's time waiting for the API)."""
        if stage != self.limiter.stage:  # a new stage: an old stage's fatal error is done
            self.limiter.stage, self.fatal = stage, None
        started = time.time()
        table = await self(batch)
        return table, started, time.time()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self.caller is None:
            self._setup()
        try:  # a fatal error cancels the requests still waiting, instead of sending them
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._one(r)) for r in batch.to_pylist()]
        except* FatalApiError as errors:
            raise errors.exceptions[0] from None
        finally:
            self.writer.flush()
        return pa.Table.from_pylist([asdict(t.result()) for t in tasks], schema=RESULT_SCHEMA)


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


def _from_cache(request_id: str, entry: dict) -> ChatResult:
    return ChatResult(
        request_id=request_id,
        text=entry["text"],
        finish_reason=entry.get("finish_reason") or "stop",
        prompt_tokens=entry.get("prompt_tokens") or 0,
        completion_tokens=entry.get("completion_tokens") or 0,
        cost_usd=0.0,  # paid for once, by the call that made the entry (it is in the ledger)
        cached=True,
    )


def limiter_name(ledger_dir: str) -> str:
    return "lion-limiter-" + hashlib.sha256(ledger_dir.encode()).hexdigest()[:16]


class ApiEngine:
    """One endpoint playing one role, for as long as the run: the ``ChatClient`` the
    algorithms are given. Holds the response-cache index and the limiter handle."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        *,
        role: str,
        cache_dir: str,
        ledger_dir: str | None,
        batch_dir: str | None = None,
        legacy_usd: float = 0.0,
        flush_s: float = 1.0,
        show_progress: bool = True,
        resident: bool = True,
        holdings: dict | None = None,
    ):
        """``holdings``: the session's record of what its engines hold (holder -> Request):
        the workers are checked against it before they start, and entered in it while they
        live."""
        if endpoint.mode == "batch" and not batch_dir:
            raise LionError(f"{role}: mode 'batch' needs a directory to record its batches in")
        self.batch_dir = batch_dir
        self.batch_stats = {"batches": 0, "resubmitted": 0}
        self.endpoint = endpoint
        self.legacy_usd = legacy_usd  # spend of a run from before the ledger, if it has none
        self.role = role
        self.model = endpoint.model
        self.cache_dir = cache_dir
        self.ledger_dir = ledger_dir
        self.flush_s = flush_s
        self.show_progress = show_progress
        self.stage = ""  # the stage the calls are billed to in the ledger (set by the driver)
        self._index: dict[str, dict] | None = None
        self._limiter = None
        self._workers: list | None = None
        # False: workers start for each call and stop after it (the behaviour before resident
        # engines, kept to compare against); True: they live until close()
        self.resident = resident
        self.holdings = holdings if holdings is not None else {}
        self.wait_intervals: list[tuple[float, float]] = []  # (start, end) of answered chunks
        self._checked = False

    # --- long-lived state -----------------------------------------------------------------

    @property
    def index(self) -> response_cache.CacheIndex:
        """The response cache's index (point lookups): opened once, reading only the shards
        written since it was last open; kept current by ``ask``."""
        if self._index is None:
            self._index = response_cache.CacheIndex(self.cache_dir)
        return self._index

    @property
    def limiter(self):
        """The endpoint's one limiter (named: a driver and a `lion-ray answer` beside it
        share it while it lives); a resumed run's new limits and cap are applied to it."""
        if self._limiter is None:
            import ray

            from lion_ray.engines.limiter import LimiterActor

            ep = self.endpoint
            options = {}
            if self.ledger_dir:
                options = {"name": limiter_name(self.ledger_dir), "get_if_exists": True}
                options["namespace"] = "lion-ray"
            self._limiter = LimiterActor.options(**options).remote(
                rpm=ep.requests_per_minute,
                tpm=ep.tokens_per_minute,
                budget_usd=ep.budget_usd,
                ledger_dir=self.ledger_dir,
                legacy_usd=self.legacy_usd,
            )
            ray.get(
                self._limiter.configure.remote(
                    ep.requests_per_minute, ep.tokens_per_minute, ep.budget_usd
                )
            )
        return self._limiter

    def limiter_state(self) -> dict:
        import ray

        return ray.get(self.limiter.snapshot.remote())

    # --- ChatClient -----------------------------------------------------------------------

    def ask(self, requests: list[ChatRequest], label: str = "") -> list[ChatResult]:
        """One result per request, in order: cache first, then the endpoint.

        Raises ``BudgetExceeded`` when the endpoint's ``budget_usd`` stopped any request (the
        answers so far are cached) and ``FatalApiError`` on a bad key or URL.
        """
        from lion_ray.progress import StageProgress

        ep = self.endpoint
        keys = [request_key(ep, r) for r in requests]
        index = self.index
        cached = index.get_many(keys)
        results: dict[int, ChatResult] = {}
        misses: dict[str, list[int]] = {}  # identical requests are sent once
        for i, (r, key) in enumerate(zip(requests, keys, strict=True)):
            entry = cached.get(key)
            if entry is not None:
                results[i] = _from_cache(r.request_id, entry)
            else:
                misses.setdefault(key, []).append(i)
        with StageProgress(
            label or f"{self.role} calls",
            total=len(requests),
            enabled=self.show_progress,
            unit="rows",
        ) as bar:
            bar.advance(len(results), cached=len(results))
            firsts = [positions[0] for positions in misses.values()]
            answered = []
            if firsts and ep.mode == "batch":
                answered, firsts = self._batch([requests[i] for i in firsts], firsts)
                for _, res in answered:
                    bar.advance(1, cost=res.cost_usd, failed=res.status == "failed")
            if firsts:
                answered = itertools.chain(
                    answered, self._send([requests[i] for i in firsts], firsts, bar)
                )
            fresh = []
            for i, res in answered:
                results[i] = res
                if res.status == "ok":  # its actor cached it; keep the index current
                    fresh.append(
                        {
                            "key": keys[i],
                            "text": res.text,
                            "finish_reason": res.finish_reason,
                            "prompt_tokens": res.prompt_tokens,
                            "completion_tokens": res.completion_tokens,
                            "cost_usd": res.cost_usd,
                        }
                    )
                for twin in misses[keys[i]][1:]:  # the same answer, paid for once
                    results[twin] = replace(
                        res, request_id=requests[twin].request_id, cached=True, cost_usd=0.0
                    )
                    bar.advance(1, cached=1)
            index.put(fresh)
        if firsts:  # the workers' small shards of this call, merged: files stay few
            response_cache.compact(self.cache_dir, index=index)
        ordered = [results[i] for i in range(len(requests))]
        refused = sum(r.status == "budget" for r in ordered)
        if refused:
            state = self.limiter_state()
            raise BudgetExceeded(
                f"{self.role}: budget_usd ${ep.budget_usd} reached: ${state['spent_usd']:.4f} "
                f"spent against it over the whole run, {refused} of {len(ordered)} requests not "
                f"sent; the answers so far are cached in {self.cache_dir}; raise "
                f"{self.role}.budget_usd and rerun to continue"
            )
        return ordered

    def _preflight(self) -> None:
        if not self._checked:  # once per engine: key present, URL reachable, key valid
            preflight(self.endpoint, self.role)
            self._checked = True

    def _batch(
        self, requests: list[ChatRequest], positions: list[int]
    ) -> tuple[list[tuple[int, ChatResult]], list[int]]:
        """Through the provider's Batch API: (position, result) pairs, and the positions to
        send online (failed batch lines, with ``batch_retry: online``)."""
        from lion_ray.engines.batch import BatchRunner

        self._preflight()
        runner = BatchRunner(
            self.endpoint,
            role=self.role,
            state_dir=self.batch_dir,
            cache_dir=self.cache_dir,
            limiter=self.limiter,
            stage=self.stage,
            show_progress=self.show_progress,
        )
        keyed = {
            request_key(self.endpoint, r): (p, r) for p, r in zip(positions, requests, strict=True)
        }
        by_key, online = runner.run({k: r for k, (_, r) in keyed.items()})
        self.batch_stats["batches"] += runner.batches_submitted
        self.batch_stats["resubmitted"] += runner.resubmitted
        answered = [
            (keyed[k][0], replace(res, request_id=keyed[k][1].request_id))
            for k, res in by_key.items()
        ]
        return answered, [keyed[k][0] for k in online]

    @property
    def workers(self) -> list:
        """The endpoint's worker actors: started on first use, alive for the run (a wave of
        8 rows costs its requests' latency, not a pool start); a dead one is restarted."""
        if self._workers is None:
            import ray

            from lion_ray.engines.cluster import preflight

            ep = self.endpoint
            request = api_workers_request(self.role, ep.num_actors)
            preflight(request, {k: v for k, v in self.holdings.items() if k != self._holder})
            self.holdings[self._holder] = request
            actor = ray.remote(ApiWorker).options(
                num_cpus=API_WORKER_CPUS, max_restarts=3, max_task_retries=3
            )
            # a named limiter goes by name: plain arguments, so a restarted worker never
            # needs an object that may be gone
            handle = self.limiter  # started (or found) before the workers look it up
            limiter = limiter_name(self.ledger_dir) if self.ledger_dir else handle
            self._workers = [
                actor.remote(
                    ep.model_dump(),
                    limiter,
                    self.cache_dir,
                    self.ledger_dir,
                    self.stage,
                    self.flush_s,
                )
                for _ in range(ep.num_actors)
            ]
        return self._workers

    def _send(self, requests: list[ChatRequest], positions: list[int], bar):
        """(position, result) for each request, as the resident workers answer them: chunks
        of ``concurrency`` requests, a few per worker in flight, results as they come."""
        import ray

        self._preflight()
        ep = self.endpoint
        rows = [
            {
                "request_id": str(p),
                "messages": json.dumps(r.messages, ensure_ascii=False),
                "seed": r.seed,
                "response_format": json.dumps(r.response_format) if r.response_format else None,
            }
            for p, r in zip(positions, requests, strict=True)
        ]
        ids = {str(p): r.request_id for p, r in zip(positions, requests, strict=True)}
        per_chunk = max(1, ep.concurrency)
        chunks = [
            pa.Table.from_pylist(rows[i : i + per_chunk], schema=REQUEST_SCHEMA)
            for i in range(0, len(rows), per_chunk)
        ]
        workers = self.workers
        pending: dict = {}
        started, sent, next_chunk = time.monotonic(), 0, 0
        try:
            while next_chunk < len(chunks) or pending:
                # each worker holds ``concurrency`` requests in flight; a few chunks queued
                # per worker keep them busy without holding the whole pool in flight
                while next_chunk < len(chunks) and len(pending) < 4 * len(workers):
                    worker = workers[next_chunk % len(workers)]
                    pending[worker.ask.remote(chunks[next_chunk], self.stage)] = next_chunk
                    next_chunk += 1
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    pending.pop(ref)
                    table, t0, t1 = ray.get(ref)
                    self.wait_intervals.append((t0, t1))
                    for row in table.to_pylist():
                        position = row.pop("request_id")
                        res = ChatResult(request_id=ids[position], **row)
                        sent += 1
                        bar.advance(1, cost=res.cost_usd, failed=res.status == "failed")
                        yield int(position), res
                bar.set_rate(sent / max(1e-6, time.monotonic() - started) * 60)
        except Exception as exc:
            for ref in pending:  # the stage stops: what is still queued is not sent
                ray.cancel(ref)
            fatal = _find_fatal(exc)
            if fatal is not None:
                raise fatal from None
            raise
        finally:
            if not self.resident:
                self._stop_workers()

    def usage(self, results: list[ChatResult]) -> dict:
        return usage(results, self.model)

    def take_wait_s(self) -> float:
        """Seconds some request of this endpoint was in flight since the last call (the
        union of the workers' busy intervals): a stage's time waiting for the API."""
        from lion_ray.logic.timing import union_seconds

        seconds = union_seconds(self.wait_intervals)
        self.wait_intervals = []
        return seconds

    @property
    def _holder(self) -> str:
        return f"the {self.role} API workers"

    def _stop_workers(self) -> None:
        if self._workers:
            import ray

            for worker in self._workers:
                ray.kill(worker)
            self._workers = None
        self.holdings.pop(self._holder, None)

    def close(self) -> None:
        """Stop the workers, merge the cache's many small shards, close the index."""
        self._stop_workers()
        try:
            response_cache.compact(self.cache_dir, index=self._index)
        finally:  # a failed merge leaves the shards as they were; the index closes anyway
            if self._index is not None:
                self._index.close()
                self._index = None


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
            original = getattr(e, "cause", None)  # Ray's wrapper: its text is a traceback
            return original if isinstance(original, FatalApiError) else e
        cause = getattr(e, "cause", None)
        stack.extend([e.__cause__, e.__context__, cause])
        if isinstance(cause, BaseException):
            stack.append(cause)
    text = str(exc)  # Ray Data passes the worker's traceback on as text only
    for cls in (QuotaExhausted, FatalApiError):  # the most specific first
        marker = f"{cls.__name__}: "
        if marker in text:
            return cls(text.split(marker, 1)[-1].strip().splitlines()[0])
    return None
