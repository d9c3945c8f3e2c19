"""The provider's Batch API for one role: the same answers at ``batch_discount`` of the price.

    runner = BatchRunner(endpoint, role="referee", state_dir=run.batch_dir("referee"), ...)
    results, online = runner.run({cache_key: request, ...})

Requests are written as JSONL (``custom_id`` is the request's cache key), uploaded through
the files API and submitted as batches, split by the provider's per-batch limits on
requests and bytes. Each batch is recorded in the run directory
(``<run>/batches/<role>/<local id>.json``) before anything is created at the provider and
again once it exists, so a driver killed while waiting resumes polling the same batches
and never submits them twice. Results are read back into the same response cache as online
calls. Lines that failed or expired are sent once more (in a new batch, or returned to be
sent online: ``batch_retry``); a second failure is final. Every request's worst case, at the
batch price, is reserved in the spend ledger before its batch is submitted, so a batch obeys
the budget like online calls, and is settled at its real cost when read back.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter

from pydantic import BaseModel, Field

from lion_ray import storage
from lion_ray.config import EndpointConfig
from lion_ray.engines import cache as response_cache
from lion_ray.logic.accounting import cost_usd
from lion_ray.logic.chat import ChatRequest, ChatResult

TERMINAL = ("completed", "failed", "expired", "cancelled")


class BatchRecord(BaseModel):
    """One batch at the provider, as the run directory remembers it."""

    local_id: str
    stage: str = ""
    keys: list[str]
    tickets: dict[str, str] = Field(default_factory=dict)  # key -> ledger ticket
    worst: dict[str, float] = Field(default_factory=dict)  # key -> reserved USD
    input_file_id: str = ""
    batch_id: str = ""
    status: str = "preparing"  # preparing | submitted | ingested
    provider_status: str = ""
    failed: dict[str, str] = Field(default_factory=dict)  # key -> error, once ingested
    created_at: float = Field(default_factory=time.time)


def _line(key: str, body: dict) -> str:
    return json.dumps(
        {"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": body},
        ensure_ascii=False,
    )


class BatchRunner:
    def __init__(
        self,
        endpoint: EndpointConfig,
        *,
        role: str,
        state_dir: str,
        cache_dir: str,
        limiter,
        stage: str = "",
        show_progress: bool = True,
    ):
        import openai

        from lion_ray.engines.api_wire import api_key

        self.endpoint = endpoint
        self.role = role
        self.state_dir = state_dir
        self.writer = response_cache.CacheWriter(cache_dir, flush_s=3600)  # flushed per batch
        self.limiter = limiter
        self.stage = stage
        self.show_progress = show_progress
        self.client = openai.OpenAI(
            base_url=endpoint.base_url,
            api_key=api_key(endpoint),
            max_retries=5,
            timeout=max(60.0, endpoint.timeout_s),
        )
        self.resubmitted = 0
        self.batches_submitted = 0

    # --- the run directory's record of batches ----------------------------------------

    def _uri(self, rec: BatchRecord) -> str:
        return storage.join(self.state_dir, f"{rec.local_id}.json")

    def _save(self, rec: BatchRecord) -> None:
        storage.write_json(self._uri(rec), rec.model_dump(mode="json"))

    def _records(self) -> list[BatchRecord]:
        return [
            BatchRecord.model_validate(storage.read_json(uri))
            for uri in storage.list_files(self.state_dir, ".json")
        ]

    # --- the whole job ----------------------------------------------------------------

    def run(self, todo: dict[str, ChatRequest]) -> tuple[dict[str, ChatResult], list[str]]:
        """Results by key for every request in ``todo``, plus the keys to send online
        (``batch_retry: online``)."""
        results: dict[str, ChatResult] = {}
        records = self._records()
        # 1. batches already at the provider (a driver killed while waiting): finish them
        active = [r for r in records if r.status != "ingested" and set(r.keys) & todo.keys()]
        self._finish(active, todo, results)
        online: list[str] = []
        for _ in range(2):  # first submissions, then the failed lines once more
            failures = Counter(k for r in self._records() for k in r.failed)
            last_error = {k: e for r in self._records() for k, e in r.failed.items()}
            send = []
            for key in todo:
                if key in results or key in online:
                    continue
                if failures[key] >= 2:
                    results[key] = ChatResult(status="failed", error=last_error[key], attempts=2)
                elif failures[key] == 1 and self.endpoint.batch_retry == "online":
                    online.append(key)
                    self.resubmitted += 1
                else:
                    self.resubmitted += failures[key]
                    send.append(key)
            if not send:
                break
            self._finish(self._submit(send, todo, results), todo, results)
        for key in todo:  # failed twice, or failed once and not sent again
            if key not in results and key not in online:
                failures = [r.failed[key] for r in self._records() if key in r.failed]
                results[key] = ChatResult(
                    status="failed", error=failures[-1] if failures else "not answered"
                )
        return results, online

    # --- submit -----------------------------------------------------------------------

    def _submit(
        self, keys: list[str], todo: dict[str, ChatRequest], results: dict[str, ChatResult]
    ) -> list[BatchRecord]:
        import ray

        from lion_ray.engines.api_wire import request_body, worst_case

        ep = self.endpoint
        worst = [worst_case(ep, todo[k].messages)[1] * ep.batch_discount for k in keys]
        tickets = ray.get(self.limiter.reserve_many.remote(worst, self.stage))
        lines: list[tuple[str, str, str, float]] = []
        for key, ticket, usd in zip(keys, tickets, worst, strict=True):
            if ticket is None:
                results[key] = ChatResult(
                    status="budget", error="not sent: the endpoint's budget_usd was reached"
                )
            else:
                lines.append((key, _line(key, request_body(ep, todo[key])), ticket, usd))
        records, chunk, size = [], [], 0
        for item in lines:
            line_bytes = len(item[1].encode()) + 1
            if chunk and (
                len(chunk) >= ep.batch_max_requests or size + line_bytes > ep.batch_max_bytes
            ):
                records.append(self._create(chunk))
                chunk, size = [], 0
            chunk.append(item)
            size += line_bytes
        if chunk:
            records.append(self._create(chunk))
        return records

    def _create(self, chunk: list[tuple[str, str, str, float]]) -> BatchRecord:
        rec = BatchRecord(
            local_id=uuid.uuid4().hex[:16],
            stage=self.stage,
            keys=[k for k, _, _, _ in chunk],
            tickets={k: t for k, _, t, _ in chunk},
            worst={k: w for k, _, _, w in chunk},
        )
        self._save(rec)  # before anything exists at the provider
        content = "".join(line + "\n" for _, line, _, _ in chunk).encode()
        upload = self.client.files.create(file=(f"{rec.local_id}.jsonl", content), purpose="batch")
        rec.input_file_id = upload.id
        self._save(rec)
        return self._start(rec)

    def _start(self, rec: BatchRecord) -> BatchRecord:
        batch = self.client.batches.create(
            input_file_id=rec.input_file_id,
            endpoint="/v1/chat/completions",
            completion_window=self.endpoint.batch_completion_window,
            metadata={"lion_ray_batch": rec.local_id, "stage": self.stage[:500]},
        )
        rec.batch_id, rec.status, rec.provider_status = batch.id, "submitted", batch.status
        self._save(rec)  # recorded before waiting: a killed driver resumes this one
        self.batches_submitted += 1
        return rec

    def _adopt(self, rec: BatchRecord) -> BatchRecord | None:
        """A record a crash left half-made: find its batch at the provider, or make it."""
        if not rec.input_file_id:  # nothing was uploaded: nothing can have been billed
            import ray

            ray.get(
                self.limiter.settle_many.remote(
                    [(rec.tickets[k], rec.worst[k], 0.0) for k in rec.keys], self.stage
                )
            )
            storage.delete_file(self._uri(rec))
            return None
        for batch in self.client.batches.list(limit=100):
            if batch.input_file_id == rec.input_file_id:
                rec.batch_id, rec.status, rec.provider_status = batch.id, "submitted", batch.status
                self._save(rec)
                return rec
        return self._start(rec)

    # --- wait and read back -------------------------------------------------------------

    def _finish(
        self,
        records: list[BatchRecord],
        todo: dict[str, ChatRequest],
        results: dict[str, ChatResult],
    ) -> None:
        from lion_ray.progress import StageProgress

        records = [r for r in (self._adopt(r) if not r.batch_id else r for r in records) if r]
        if not records:
            return
        total = sum(len(r.keys) for r in records)
        label = f"{self.role} batch ({len(records)} batch{'es' if len(records) > 1 else ''})"
        waiting = {r.batch_id: r for r in records}
        with StageProgress(label, total=total, enabled=self.show_progress, unit="rows") as bar:
            while waiting:
                done = failed = 0
                for batch_id, rec in list(waiting.items()):
                    batch = self.client.batches.retrieve(batch_id)
                    counts = batch.request_counts
                    failed += counts.failed if counts else 0
                    if batch.status in TERMINAL:  # counted whole below, once
                        self._ingest(rec, batch, results)
                        del waiting[batch_id]
                    elif counts:  # rows done so far in a batch still running
                        done += counts.completed + counts.failed
                finished = sum(len(r.keys) for r in records if r.batch_id not in waiting)
                progress = finished + done
                bar.failed = failed
                bar.advance(max(0, progress - bar.done))
                if waiting:
                    time.sleep(self.endpoint.batch_poll_s)

    def _read_lines(self, file_id: str | None) -> list[dict]:
        if not file_id:
            return []
        text = self.client.files.content(file_id).text
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _ingest(self, rec: BatchRecord, batch, results: dict[str, ChatResult]) -> None:
        """Answers into the cache, real costs into the ledger, then the record: ingested."""
        import ray

        ep = self.endpoint
        lines = {
            line["custom_id"]: line
            for file_id in (batch.output_file_id, batch.error_file_id)
            for line in self._read_lines(file_id)
        }
        settlements = []
        rec.failed = {}
        for key in rec.keys:
            line = lines.get(key)
            response = (line or {}).get("response") or {}
            if response.get("status_code") == 200:
                body = response["body"]
                choice, used = body["choices"][0], body.get("usage") or {}
                res = ChatResult(
                    text=choice["message"].get("content") or "",
                    finish_reason=choice.get("finish_reason") or "",
                    attempts=1,
                    prompt_tokens=used.get("prompt_tokens", 0),
                    completion_tokens=used.get("completion_tokens", 0),
                )
                res.cost_usd = ep.batch_discount * cost_usd(
                    res.prompt_tokens,
                    res.completion_tokens,
                    ep.price_per_1k_input,
                    ep.price_per_1k_output,
                )
                results[key] = res
                self.writer.add(
                    {
                        "key": key,
                        "text": res.text,
                        "finish_reason": res.finish_reason,
                        "prompt_tokens": res.prompt_tokens,
                        "completion_tokens": res.completion_tokens,
                        "cost_usd": res.cost_usd,
                    }
                )
                settlements.append((rec.tickets[key], rec.worst[key], res.cost_usd))
            else:
                error = (line or {}).get("error") or (response.get("body") or {}).get("error") or {}
                status = response.get("status_code")
                rec.failed[key] = (
                    (
                        f"batch {batch.status}: "
                        + (f"{status}: " if status else "")
                        + (error.get("code") or "")
                        + (f" {error.get('message')}" if error.get("message") else "")
                    ).strip()
                    if line
                    else f"batch {batch.status}: no result for this request"
                )
                settlements.append((rec.tickets[key], rec.worst[key], 0.0))  # not billed
        self.writer.flush()
        ray.get(self.limiter.settle_many.remote(settlements, self.stage))
        rec.status, rec.provider_status = "ingested", batch.status
        self._save(rec)
