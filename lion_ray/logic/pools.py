"""Instruction pools: import from the common formats, stable ids, provenance, stats, export.

A pool is a pyarrow Table with :data:`POOL_SCHEMA`. Every row has a stable id (a hash of the
normalised instruction and input), so the same instruction keeps its id across rounds,
files and machines, and exact duplicates collapse to one row.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from lion_ray.errors import LionError

POOL_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("output", pa.string()),  # reference answer from the source, "" when it had none
        ("source", pa.string()),
        ("round", pa.int32()),  # 0 for the seed pool, r for instructions generated in round r
        ("parent_id", pa.string()),  # instruction it was derived from, "" for seeds
        ("kind", pa.string()),  # seed | hard | easy
    ]
)
KINDS = ("seed", "hard", "easy")

# One answer per pool row, from the teacher (API) or the student (inference).
ANSWER_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("answer", pa.string()),
        ("status", pa.string()),  # ok | failed (failed rows are kept, never given invented text)
        ("error", pa.string()),
        ("finish_reason", pa.string()),  # stop | length
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        ("cached", pa.bool_()),
    ]
)


class TextHashes:
    """Which texts a pool holds, as a sorted array of 64-bit hashes: 8 bytes a row, where a
    set of a million instructions takes about 150 MB of the driver. Answers ``text in``
    (a false positive needs a 64-bit collision)."""

    def __init__(self, texts: Iterable[Iterable[str]]):
        import numpy as np

        parts = [np.fromiter(map(_hash64, chunk), dtype=np.uint64) for chunk in texts]
        self._hashes = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)

    def __contains__(self, text: object) -> bool:
        import numpy as np

        if not isinstance(text, str):
            return False
        h = np.uint64(_hash64(text))
        i = int(np.searchsorted(self._hashes, h))
        return i < len(self._hashes) and self._hashes[i] == h

    def __len__(self) -> int:
        return len(self._hashes)


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class PoolFormatError(LionError, ValueError):
    """Input that cannot be read as a pool; the message names the file and line or record."""


@dataclass
class ImportStats:
    records: int = 0
    imported: int = 0
    duplicates: int = 0
    empty: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Unicode NFC, whitespace runs collapsed, ends stripped. Case is kept: it can matter."""
    return _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def instruction_id(instruction: str, input_text: str = "") -> str:
    key = normalize(instruction) + "\x1f" + normalize(input_text)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def detect_format(name: str, head: bytes) -> str:
    lower = name.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".jsonl") or lower.endswith(".ndjson"):
        return "jsonl"
    stripped = head.lstrip()
    return "json" if stripped.startswith(b"[") else "jsonl"


def _records_from_json_text(text: str, name: str) -> Iterator[tuple[object, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PoolFormatError(f"{name}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, list):
        raise PoolFormatError(f"{name}: a .json pool must be an array of records")
    for i, rec in enumerate(data):
        yield rec, f"{name}: record {i}"


def _records_from_jsonl_text(text: str, name: str) -> Iterator[tuple[object, str]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PoolFormatError(
                f"{name}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); each line of a "
                ".jsonl pool must be one JSON object"
            ) from None
        yield rec, f"{name}:{lineno}"


def read_parquet_bytes(data: bytes) -> pa.Table:
    """A Parquet file's table from its bytes, copied into Arrow's own memory first: Arrow's
    reader threads must not hold a Python object (``BytesIO`` or a ``bytes`` buffer), or
    one may still reach for the GIL while the interpreter exits, which aborts the process
    (``terminate called without an active exception``) after its work is done."""
    copy = pa.BufferOutputStream()
    copy.write(data)
    return pq.read_table(pa.BufferReader(copy.getvalue()))


def iter_records(data: bytes, name: str) -> Iterator[tuple[object, str]]:
    """(record, location) pairs from the bytes of a pool file called ``name``."""
    fmt = detect_format(name, data[:64])
    if fmt == "parquet":
        table = read_parquet_bytes(data)
        for i, rec in enumerate(table.to_pylist()):
            yield rec, f"{name}: row {i}"
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PoolFormatError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    yield from (_records_from_json_text if fmt == "json" else _records_from_jsonl_text)(text, name)


def _text_field(rec: dict, field: str, where: str) -> str:
    value = rec.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PoolFormatError(
            f"{where}: field '{field}' must be a string, got {type(value).__name__}"
        )
    return value


def _expand(rec: object, where: str) -> Iterator[tuple[str, str, str]]:
    """(instruction, input, output) triples of one record in any supported shape."""
    if not isinstance(rec, dict):
        raise PoolFormatError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "instruction" not in rec:
        keys = ", ".join(sorted(rec)) or "none"
        raise PoolFormatError(
            f"{where}: record has no 'instruction' field (fields: {keys}); each record needs "
            "'instruction', optionally 'input' and 'output', or self-instruct 'instances'"
        )
    instruction = _text_field(rec, "instruction", where)
    instances = rec.get("instances")
    if isinstance(instances, list) and instances:  # self-instruct seed-task format
        for j, inst in enumerate(instances):
            if not isinstance(inst, dict):
                raise PoolFormatError(f"{where}: instances[{j}] must be an object")
            yield instruction, _text_field(inst, "input", where), _text_field(inst, "output", where)
    else:
        yield instruction, _text_field(rec, "input", where), _text_field(rec, "output", where)


def make_row(
    instruction: str,
    input_text: str = "",
    output: str = "",
    *,
    source: str,
    round_no: int = 0,
    parent_id: str = "",
    kind: str = "seed",
) -> dict:
    return {
        "id": instruction_id(instruction, input_text),
        "instruction": instruction.strip(),
        "input": input_text.strip(),
        "output": output,
        "source": source,
        "round": round_no,
        "parent_id": parent_id,
        "kind": kind,
    }


def build_pool(rows: Iterable[dict], stats: ImportStats | None = None) -> pa.Table:
    """A pool table from row dicts, dropping exact duplicates (by id) and counting them."""
    stats = stats or ImportStats()
    seen: set[str] = set()
    kept = []
    for row in rows:
        if row["id"] in seen:
            stats.duplicates += 1
            continue
        seen.add(row["id"])
        kept.append(row)
    stats.imported = len(kept)
    return pa.Table.from_pylist(kept, schema=POOL_SCHEMA)


def import_records(
    records: Iterable[tuple[object, str]], *, source: str, round_no: int = 0, kind: str = "seed"
) -> tuple[pa.Table, ImportStats]:
    """A pool from (record, location) pairs; empty instructions are skipped and counted."""
    stats = ImportStats()
    rows = []
    for rec, where in records:
        stats.records += 1
        for instruction, input_text, output in _expand(rec, where):
            if not instruction.strip():
                stats.empty += 1
                continue
            rows.append(
                make_row(
                    instruction, input_text, output, source=source, round_no=round_no, kind=kind
                )
            )
    return build_pool(rows, stats), stats


def empty_pool() -> pa.Table:
    return POOL_SCHEMA.empty_table()


def concat_pools(*pools: pa.Table) -> pa.Table:
    """Pools joined in order, keeping the first row of each id."""
    return build_pool(pa.concat_tables([p.select(POOL_SCHEMA.names) for p in pools]).to_pylist())


def pool_stats(table: pa.Table) -> dict:
    rows = table.to_pylist()
    words = [len(r["instruction"].split()) for r in rows]
    return {
        "rows": len(rows),
        "with_input": sum(1 for r in rows if r["input"]),
        "with_output": sum(1 for r in rows if r["output"]),
        "by_kind": dict(Counter(r["kind"] for r in rows)),
        "by_round": {str(k): v for k, v in sorted(Counter(r["round"] for r in rows).items())},
        "by_source": dict(Counter(r["source"] for r in rows).most_common(10)),
        "instruction_words": {
            "min": min(words, default=0),
            "mean": round(sum(words) / len(words), 2) if words else 0,
            "max": max(words, default=0),
        },
    }


def to_alpaca(table: pa.Table) -> list[dict]:
    """Alpaca-shaped records (instruction, input, output)."""
    return [
        {"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
        for r in table.to_pylist()
    ]


def validate_pool(table: pa.Table, name: str) -> pa.Table:
    """Check a table read from disk is a pool; returns it with the canonical column order."""
    missing = [f for f in POOL_SCHEMA.names if f not in table.column_names]
    if missing:
        raise PoolFormatError(
            f"{name}: not a lion-ray pool (missing columns: {', '.join(missing)}); "
            "create one with `lion-ray pool import`"
        )
    return table.select(POOL_SCHEMA.names).cast(POOL_SCHEMA)


def load_pool_bytes(
    data: bytes, name: str, *, source: str | None = None
) -> tuple[pa.Table, ImportStats]:
    """A pool from file bytes: a lion-ray Parquet pool as is, anything else imported."""
    if detect_format(name, data[:64]) == "parquet":
        table = read_parquet_bytes(data)
        if "id" in table.column_names and "kind" in table.column_names:
            table = validate_pool(table, name)
            return table, ImportStats(records=table.num_rows, imported=table.num_rows)
    label = source or name.rsplit("/", 1)[-1]
    return import_records(iter_records(data, name), source=label)


def next_pools(
    train: pa.Table, cache: pa.Table, new: pa.Table, policy: str = "paper"
) -> tuple[pa.Table, pa.Table]:
    """The next round's (Train Pool, Cache Pool) after generation.

    'paper': the Train Pool is exactly the new instructions; 'accumulate': the old Train
    Pool plus the new ones. The Cache Pool always becomes the old one plus the new ones.
    """
    if policy not in ("paper", "accumulate"):
        raise ValueError(f"unknown pool policy {policy!r}; use 'paper' or 'accumulate'")
    next_cache = concat_pools(cache, new)
    next_train = concat_pools(train, new) if policy == "accumulate" else concat_pools(new)
    return next_train, next_cache
