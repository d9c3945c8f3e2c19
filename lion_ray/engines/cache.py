"""Durable response cache: no paid call is made twice.

Keyed by a hash of (model, sampling params, messages). Each API actor appends responses to
a buffer and writes it as a new JSONL shard under ``<run>/cache/<role>/`` at most every
``flush_s`` seconds (whole files, renamed into place: works on local disks and object
stores alike), so a crash loses at most the last ``flush_s`` seconds of responses. Only
successful responses are cached; entries hold no headers and no keys.

The driver looks entries up through a ``CacheIndex``: a SQLite file on its own disk (the
run directory's when it is local, else a temporary folder) that holds every shard it has
read, and the names of those shards, so that opening it reads only the shards written
since (a snapshot plus a tail), and a window's keys are found by point lookups, never by
loading the whole cache. SQLite, not keyed Parquet: a window's keys are random hashes, so
any sorted file would be read whole for each window, while an indexed table answers each
key in microseconds and takes new entries one at a time; it cannot live on an object store,
which is why the shards stay the durable copy and the index is rebuilt from them when lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator

import pyarrow.fs as pafs

from lion_ray import storage

CACHE_PARAMS = ("temperature", "top_p", "max_tokens", "seed")
MERGED = "compact-"  # a shard made by merging others
SMALL_SHARD = 1 << 20  # bytes: a shard below this is merged with others
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


class CacheIndex:
    """Point lookups into a role's response cache, without holding it in memory."""

    FIELDS = ("text", "finish_reason", "prompt_tokens", "completion_tokens", "cost_usd")

    def __init__(self, cache_dir: str, path: str | None = None):
        import sqlite3

        self.cache_dir = cache_dir
        self.path = path or index_path(cache_dir)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # one connection, used from the driver's threads in turn (a stage at a time)
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, text TEXT, "
            "finish_reason TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, "
            "cost_usd REAL)"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY)")
        self.refresh()

    def refresh(self) -> int:
        """Read the shards written since the last refresh (by any process); returns how many."""
        seen = {row[0] for row in self.db.execute("SELECT name FROM shards")}
        listed = {_name(s): s for s in storage.list_files(self.cache_dir, ".jsonl")}
        with self.db:
            self.db.execute("BEGIN")
            if seen and not seen & listed.keys():
                # none of the shards it read is there (an object-store run directory deleted
                # and made again under the same URI): this index is another cache's
                self.db.execute("DELETE FROM entries")
                seen = set()
            gone = [(name,) for name in seen - listed.keys()]  # merged: their entries stay
            self.db.executemany("DELETE FROM shards WHERE name = ?", gone)
        fresh = [uri for name, uri in listed.items() if name not in seen]
        for shard in fresh:
            self._put(_entries(shard), shard=_name(shard))
        return len(fresh)

    def _put(self, entries: Iterable[dict], shard: str | None = None) -> None:
        rows = (
            (e["key"], *(e.get(f) for f in self.FIELDS))
            for e in entries
            if isinstance(e, dict) and "key" in e
        )
        with self.db:  # one transaction: a shard is in the index whole, or not at all
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?)", rows)
            if shard is not None:
                self.db.execute("INSERT OR IGNORE INTO shards VALUES (?)", (shard,))

    def mark_read(self, shard_name: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO shards VALUES (?)", (shard_name,))

    def put(self, entries: Iterable[dict]) -> None:
        """Entries the driver already has (answers it just got): looked up from now on."""
        self._put(entries)

    def get_many(self, keys: Iterable[str]) -> dict[str, dict]:
        """The cached entries among ``keys``."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, dict] = {}
        for start in range(0, len(keys), 500):  # SQLite's bound on parameters per query
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.db.execute(
                f"SELECT key, {', '.join(self.FIELDS)} FROM entries WHERE key IN ({marks})", chunk
            ):
                found[row[0]] = dict(zip(self.FIELDS, row[1:], strict=True))
        return found

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def index_path(cache_dir: str) -> str:
    """Where a cache's index lives: beside it on a local run directory, else in a temporary
    folder of this machine (SQLite needs a real disk; a new machine rebuilds it)."""
    if storage.is_local(cache_dir):
        return os.path.join(storage.resolve(cache_dir)[1], ".index", "entries.sqlite")
    digest = hashlib.sha256(cache_dir.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "lion-ray-cache-index", f"{digest}.sqlite")


def _name(shard_uri: str) -> str:
    return shard_uri.rsplit("/", 1)[-1]


def _entries(shard_uri: str) -> Iterator[dict]:
    for line in storage.read_text(shard_uri).splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue  # a shard is written whole: a bad line only comes from outside lion-ray


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


def compact(cache_dir: str, min_shards: int = 64, index: CacheIndex | None = None) -> int:
    """Merge the small shards (the workers' flushes since the last merge) into one, a shard
    at a time (never the whole cache in memory); large shards, earlier merges among them,
    are left as they are, so a merge costs about what was written since. Returns the shards
    merged. ``index``: records the merged shard as read, so the driver does not read it
    again."""
    fs, root = storage.resolve(cache_dir)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return 0
    shards = [
        storage.join(cache_dir, info.base_name)
        for info in fs.get_file_info(pafs.FileSelector(root))
        if info.base_name.endswith(".jsonl")
        and not info.base_name.startswith(".")
        and info.size < SMALL_SHARD
    ]
    if len(shards) < min_shards:
        return 0
    if index is not None:
        index.refresh()  # every shard merged below is in the index
    merged = storage.join(cache_dir, f"{MERGED}{uuid.uuid4().hex[:12]}.jsonl")
    with storage.atomic_output(merged) as out:
        for shard in shards:
            text = storage.read_text(shard)
            out.write((text if text.endswith("\n") or not text else text + "\n").encode())
    if index is not None:  # its entries are there already: only its name is new
        index.mark_read(_name(merged))
    fs, _ = storage.resolve(cache_dir)
    for shard in shards:
        fs.delete_file(storage.resolve(shard)[1])
    return len(shards)
