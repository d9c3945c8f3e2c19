"""The rows a student stage gets back: one answer row, one loss row, whichever engine ran."""

from __future__ import annotations

import time

import pyarrow as pa

from lion_ray.logic.pools import ANSWER_SCHEMA

LOSS_SCHEMA = pa.schema([("id", pa.string()), ("loss", pa.float64()), ("error", pa.string())])


def answer_row(row: dict, out: dict | None, error: str = "", prompt_tokens: int = 0) -> dict:
    """A pool row (id, instruction, input) with the student's answer ``out`` (answer,
    finish_reason, prompt_tokens, completion_tokens), or, without one, marked failed with
    ``error``: every row comes back, none is invented."""
    return {
        "id": row["id"],
        "instruction": row["instruction"],
        "input": row["input"],
        "answer": out["answer"] if out else "",
        "status": "ok" if out else "failed",
        "error": "" if out else (error or "inference returned no answer")[:300],
        "finish_reason": out["finish_reason"] if out else "",
        "prompt_tokens": out["prompt_tokens"] if out else prompt_tokens,
        "completion_tokens": out["completion_tokens"] if out else 0,
        "cost_usd": 0.0,
        "cached": False,
    }


def answers_table(rows: list[dict], outs: list[dict | None], error: str = "") -> pa.Table:
    """Answer rows for a batch: each out is a result, None (failed with ``error``) or
    {"error": ...} (that row failed on its own)."""
    return pa.Table.from_pylist(
        [
            answer_row(r, None if o is None or "error" in o else o, (o or {}).get("error", error))
            for r, o in zip(rows, outs, strict=True)
        ],
        schema=ANSWER_SCHEMA,
    )


def result_or_error(out) -> dict:
    """One row's generation result, or the error that replaced it ({"error": ...})."""
    if isinstance(out, BaseException):
        return {"error": f"{type(out).__name__}: {str(out)[:300]}"}
    return out


def loss_table(rows: list[dict], losses: list, error: str) -> pa.Table:
    return pa.Table.from_pylist(
        [{"id": r["id"], "loss": x, "error": error} for r, x in zip(rows, losses, strict=True)],
        schema=LOSS_SCHEMA,
    )


def timed(table: pa.Table, t0: float, t1: float | None = None) -> pa.Table:
    """A batch's rows with when its engine worked on them (a stage's compute time)."""
    t1, n = t1 or time.time(), table.num_rows
    return table.append_column("_t0", pa.array([t0] * n)).append_column("_t1", pa.array([t1] * n))


def row_seed(seed: int, row_id: str) -> int:
    """A sampling seed of its own for each row, the same on every rerun: one seed for every
    request would draw every row's tokens from the same random stream."""
    import hashlib

    return (seed + int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16)) % (2**31)
