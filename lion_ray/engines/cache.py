"""Durable response cache: no paid call is made twice.

Keyed by a hash of (model, sampling params, messages). Each API actor appends responses to
a buffer and writes it as a new JSONL shard under ``<run>/cache/<role>/`` at most every
``flush_s`` seconds (whole files, renamed into place: works on local disks and object
stores alike), so a crash loses at most the last ``flush_s`` seconds of responses. Only
successful responses are cached; entries hold no headers and no keys.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable

from lion_ray import storage

CACHE_PARAMS = ("temperature", "top_p", "max_tokens", "seed")
# Parameters that joined the key later: part of it only when sent, so the keys of requests
# without them (and the caches of older runs) stay what they were.
OPTIONAL_CACHE_PARAMS = ("max_completion_tokens", "response_format")


def cache_key(model: str, params: dict, messages: list[dict]) -> str:
    payload = {
        "model": model,
        "params": {k: params.get(k) for k in CACHE_PARAMS}
        | {k: params[k] for k in OPTIONAL_CACHE_PARAMS if params.get(k) is not None},
        "messages": [{"role": m["role"], "content": m.get("content")} for m in messages],
    }
    return hashlib.sha256(
        json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()


class CacheWriter:
    """Buffers entries and writes them as new shards, at most every ``flush_s`` seconds."""

    def __init__(self, cache_dir: str, flush_s: float = 1.0):
        self.cache_dir = cache_dir
        self.flush_s = flush_s
        self.writer_id = uuid.uuid4().hex[:12]
        self.seq = 0
        self.buffer: list[dict] = []
        self.last_flush = time.monotonic()

    def add(self, entry: dict) -> None:
        self.buffer.append(entry)
        if time.monotonic() - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.buffer:
            return
        lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.buffer)
        self.seq += 1
        storage.write_text(
            storage.join(self.cache_dir, f"{self.writer_id}-{self.seq:06d}.jsonl"), lines
        )
        self.buffer = []


def load(cache_dir: str, wanted: Iterable[str] | None = None) -> dict[str, dict]:
    """Cached entries by key (only ``wanted`` keys when given). Unreadable lines are skipped:
    a shard is written whole, so a bad line can only come from outside lion-ray."""
    keys = set(wanted) if wanted is not None else None
    found: dict[str, dict] = {}
    for shard in storage.list_files(cache_dir, ".jsonl"):
        for line in storage.read_text(shard).splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if keys is None or entry.get("key") in keys:
                found[entry["key"]] = entry
    return found


def compact(cache_dir: str, min_shards: int = 64) -> int:
    """Merge many small shards into one (after a stage); returns the shards merged."""
    shards = storage.list_files(cache_dir, ".jsonl")
    if len(shards) < min_shards:
        return 0
    entries = load(cache_dir)
    lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries.values())
    storage.write_text(storage.join(cache_dir, f"compact-{uuid.uuid4().hex[:12]}.jsonl"), lines)
    fs, _ = storage.resolve(cache_dir)
    for shard in shards:
        fs.delete_file(storage.resolve(shard)[1])
    return len(shards)
