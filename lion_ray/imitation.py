"""Stage 1 of a Lion round, imitation: the teacher answers every Train Pool instruction,
then the student is fine-tuned on (instruction, teacher answer), continuing from the
previous round's checkpoint.

Engines are passed in (an endpoint, a training config); this module only orchestrates.
"""

from __future__ import annotations

import pyarrow as pa

from lion_ray.config import EndpointConfig
from lion_ray.logic.pools import ANSWER_SCHEMA
from lion_ray.logic.prompts import TemplateName, teacher_messages


def teacher_answers(
    pool: pa.Table,
    endpoint: EndpointConfig,
    *,
    template: TemplateName,
    cache_dir: str,
    spent_usd: float = 0.0,
    label: str = "teacher answers",
    show_progress: bool = True,
) -> tuple[pa.Table, dict]:
    """One teacher answer per pool row (failed rows are kept, marked, never invented)."""
    from lion_ray.engines.api import make_requests, run_chat_requests

    rows = pool.to_pylist()
    requests = make_requests(
        [(r["id"], teacher_messages(r["instruction"], r["input"], template), None) for r in rows]
    )
    results, summary = run_chat_requests(
        requests,
        endpoint,
        role="teacher",
        cache_dir=cache_dir,
        spent_usd=spent_usd,
        progress_label=label,
        show_progress=show_progress,
    )
    by_id = {r["request_id"]: r for r in results.to_pylist()}
    answers = [
        {
            "id": r["id"],
            "instruction": r["instruction"],
            "input": r["input"],
            "answer": by_id[r["id"]]["text"],
            "status": by_id[r["id"]]["status"],
            "error": by_id[r["id"]]["error"],
            "finish_reason": by_id[r["id"]]["finish_reason"],
            "prompt_tokens": by_id[r["id"]]["prompt_tokens"],
            "completion_tokens": by_id[r["id"]]["completion_tokens"],
            "cost_usd": by_id[r["id"]]["cost_usd"],
            "cached": by_id[r["id"]]["cached"],
        }
        for r in rows
    ]
    return pa.Table.from_pylist(answers, schema=ANSWER_SCHEMA), summary
