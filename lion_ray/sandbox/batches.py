"""The sandbox's Batch API, as OpenAI serves it, answered by the same world as online calls.

    POST /v1/files (multipart: file, purpose)    GET /v1/files/{id}    GET /v1/files/{id}/content
    POST /v1/batches    GET /v1/batches/{id}    POST /v1/batches/{id}/cancel    GET /v1/batches

A batch is validated when created (input file exists, every line is a chat-completions
request with a unique custom_id), then completes ``delay_s`` later (half its lines at half
time, so progress shows). Faults, all optional: a fraction of lines fails the first time
its custom_id is submitted (a transient error, as providers have them), and a fraction of
batches expires with only half of its lines done. Successful lines are counted as billed
batch usage in ``/stats``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from lion_ray.logic.accounting import estimate_prompt_tokens, estimate_tokens
from lion_ray.sandbox import world


@dataclass
class BatchOptions:
    delay_s: float = 1.0
    fail_rate: float = 0.0
    expire_rate: float = 0.0


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None}}
    body["error"]["code"] = code
    return JSONResponse(body, status_code=status)


class BatchService:
    """Files and batches in memory; ``counts()`` is the server's /stats counter (a reset
    replaces it)."""

    def __init__(self, options: BatchOptions, world_options, counts, rng):
        self.options = options
        self.world_options = world_options
        self._counts = counts
        self.rng = rng
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.submitted: Counter = Counter()  # custom_id -> times submitted
        self.succeeded: set[str] = set()  # custom_ids answered in some batch

    @property
    def counts(self) -> Counter:
        return self._counts()

    # --- files ------------------------------------------------------------------------

    def add_file(self, content: bytes, filename: str, purpose: str) -> dict:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
        }
        self.files[file_id] = {"meta": meta, "content": content}
        return meta

    # --- batches ----------------------------------------------------------------------

    def create(self, input_file_id: str, endpoint: str, window: str, metadata: dict | None):
        now = int(time.time())
        batch = {
            "id": f"batch_{uuid.uuid4().hex[:24]}",
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata or {},
        }
        self.batches[batch["id"]] = batch
        self.counts["batches_created"] += 1
        problem, lines = self._validate(input_file_id, endpoint)
        if problem:
            batch["status"], batch["failed_at"] = "failed", now
            batch["errors"] = {
                "object": "list",
                "data": [{"code": "invalid_file", "message": problem}],
            }
            return batch
        batch["request_counts"]["total"] = len(lines)
        batch["status"], batch["in_progress_at"] = "in_progress", now
        for line in lines:
            self.submitted[line["custom_id"]] += 1
            self.counts["batch_lines"] += 1
            if line["custom_id"] in self.succeeded:
                self.counts["batch_lines_resubmitted_after_success"] += 1
        asyncio.get_running_loop().create_task(self._process(batch, lines))
        return batch

    def _validate(self, input_file_id: str, endpoint: str) -> tuple[str, list[dict]]:
        if input_file_id not in self.files:
            return f"no file {input_file_id}", []
        if endpoint != "/v1/chat/completions":
            return f"endpoint {endpoint} is not supported here", []
        lines, ids = [], set()
        text = self.files[input_file_id]["content"].decode()
        for n, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                return f"line {n} is not JSON", []
            if line.get("url") != endpoint or "body" not in line or "custom_id" not in line:
                return f"line {n} needs custom_id, method, url {endpoint} and body", []
            if line["custom_id"] in ids:
                return f"line {n}: custom_id {line['custom_id']} is not unique", []
            ids.add(line["custom_id"])
            lines.append(line)
        if not lines:
            return "the input file has no requests", []
        return "", lines

    def _answer(self, line: dict) -> dict:
        body = line["body"]
        messages = body["messages"]
        try:
            _, text = world.reply(
                messages, body.get("seed"), self.world_options, body.get("response_format")
            )
        except world.UnrecognisedRequest as exc:
            return {"status_code": 400, "body": {"error": {"message": str(exc), "code": None}}}
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 1024
        finish = "stop"
        if estimate_tokens(text) > limit:
            text, finish = text[: limit * 4], "length"
        usage = {
            "prompt_tokens": estimate_prompt_tokens(messages),
            "completion_tokens": estimate_tokens(text),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.counts["batch_served"] += 1
        self.counts["batch_prompt_tokens"] += usage["prompt_tokens"]
        self.counts["batch_completion_tokens"] += usage["completion_tokens"]
        self.succeeded.add(line["custom_id"])
        return {
            "status_code": 200,
            "request_id": uuid.uuid4().hex,
            "body": {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "sandbox"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            },
        }

    async def _process(self, batch: dict, lines: list[dict]) -> None:
        expire = self.options.expire_rate and self.rng.random() < self.options.expire_rate
        cut = len(lines) // 2 if expire else len(lines)
        out, err = [], []
        middle = len(lines) // 2
        for start, end in ((0, middle), (middle, cut)):
            await asyncio.sleep(self.options.delay_s / 2)
            if batch["status"] != "in_progress":  # cancelled meanwhile
                return
            for line in lines[start:end]:
                first_time = self.submitted[line["custom_id"]] == 1
                if (
                    first_time
                    and self.options.fail_rate
                    and self.rng.random() < self.options.fail_rate
                ):
                    self.counts["batch_failed_lines"] += 1
                    batch["request_counts"]["failed"] += 1
                    err.append(
                        {
                            "id": f"batch_req_{uuid.uuid4().hex[:24]}",
                            "custom_id": line["custom_id"],
                            "response": {
                                "status_code": 500,
                                "request_id": uuid.uuid4().hex,
                                "body": {
                                    "error": {
                                        "message": "The server had an error "
                                        "processing this request.",
                                        "type": "server_error",
                                        "code": None,
                                    }
                                },
                            },
                            "error": None,
                        }
                    )
                    continue
                response = self._answer(line)
                record = {
                    "id": f"batch_req_{uuid.uuid4().hex[:24]}",
                    "custom_id": line["custom_id"],
                    "response": response,
                    "error": None,
                }
                if response["status_code"] == 200:
                    batch["request_counts"]["completed"] += 1
                    out.append(record)
                else:
                    batch["request_counts"]["failed"] += 1
                    err.append(record)
        now = int(time.time())
        for line in lines[cut:]:
            self.counts["batch_expired_lines"] += 1
            err.append(
                {
                    "id": f"batch_req_{uuid.uuid4().hex[:24]}",
                    "custom_id": line["custom_id"],
                    "response": None,
                    "error": {
                        "code": "batch_expired",
                        "message": "This request could not be executed before the completion "
                        "window expired.",
                    },
                }
            )
        if out:
            content = "".join(json.dumps(r) + "\n" for r in out).encode()
            batch["output_file_id"] = self.add_file(content, "output.jsonl", "batch_output")["id"]
        if err:
            content = "".join(json.dumps(r) + "\n" for r in err).encode()
            batch["error_file_id"] = self.add_file(content, "errors.jsonl", "batch_output")["id"]
        batch["finalizing_at"] = now
        if expire:
            batch["status"], batch["expired_at"] = "expired", now
        else:
            batch["status"], batch["completed_at"] = "completed", now


def add_batch_routes(app: FastAPI, service: BatchService, authorized) -> None:
    """The files and batches routes; ``authorized(request)`` returns a 401 response or None."""

    @app.post("/v1/files")
    async def upload(request: Request, file: UploadFile = File(...), purpose: str = Form(...)):
        if (denied := authorized(request)) is not None:
            return denied
        return service.add_file(await file.read(), file.filename or "upload.jsonl", purpose)

    @app.get("/v1/files/{file_id}")
    async def file_meta(request: Request, file_id: str):
        if (denied := authorized(request)) is not None:
            return denied
        if file_id not in service.files:
            return _error(404, f"No such File object: {file_id}")
        return service.files[file_id]["meta"]

    @app.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str):
        if (denied := authorized(request)) is not None:
            return denied
        if file_id not in service.files:
            return _error(404, f"No such File object: {file_id}")
        return Response(service.files[file_id]["content"], media_type="application/octet-stream")

    @app.post("/v1/batches")
    async def create(request: Request):
        if (denied := authorized(request)) is not None:
            return denied
        body = await request.json()
        if not body.get("input_file_id") or not body.get("endpoint"):
            return _error(400, "input_file_id and endpoint are required")
        return service.create(
            body["input_file_id"],
            body["endpoint"],
            body.get("completion_window", "24h"),
            body.get("metadata"),
        )

    @app.get("/v1/batches/{batch_id}")
    async def retrieve(request: Request, batch_id: str):
        if (denied := authorized(request)) is not None:
            return denied
        if batch_id not in service.batches:
            return _error(404, f"No such Batch object: {batch_id}")
        return service.batches[batch_id]

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel(request: Request, batch_id: str):
        if (denied := authorized(request)) is not None:
            return denied
        batch = service.batches.get(batch_id)
        if batch is None:
            return _error(404, f"No such Batch object: {batch_id}")
        if batch["status"] in ("validating", "in_progress"):
            batch["status"], batch["cancelled_at"] = "cancelled", int(time.time())
        return batch

    @app.get("/v1/batches")
    async def list_batches(request: Request, limit: int = 20, after: str | None = None):
        if (denied := authorized(request)) is not None:
            return denied
        items = sorted(service.batches.values(), key=lambda b: b["created_at"], reverse=True)
        if after:
            ids = [b["id"] for b in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
