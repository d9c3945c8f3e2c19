"""Stage 1 of a Lion round, imitation: the teacher answers every Train Pool instruction,
then the student is fine-tuned on (instruction, teacher answer), continuing from the
previous round's checkpoint.

Engines are passed in (a chat client, a training config); this module only orchestrates.
"""

from __future__ import annotations

import pyarrow as pa

from lion_ray.logic.chat import ChatClient, ChatRequest, usage
from lion_ray.logic.pools import ANSWER_SCHEMA
from lion_ray.logic.prompts import teacher_messages


def teacher_answers(
    pool: pa.Table, teacher: ChatClient, *, label: str = "teacher answers"
) -> tuple[pa.Table, dict]:
    """One teacher answer per pool row (failed rows are kept, marked, never invented);
    returns the answers and the teacher's API usage. The request does not depend on the
    student's prompt format, so the same cached answers serve any student."""
    rows = pool.to_pylist()
    results = teacher.ask(
        [ChatRequest(r["id"], teacher_messages(r["instruction"], r["input"])) for r in rows],
        label=label,
    )
    answers = [
        {
            "id": r["id"],
            "instruction": r["instruction"],
            "input": r["input"],
            "answer": res.text,
            "status": res.status,
            "error": res.error,
            "finish_reason": res.finish_reason,
            "prompt_tokens": res.prompt_tokens,
            "completion_tokens": res.completion_tokens,
            "cost_usd": res.cost_usd,
            "cached": res.cached,
        }
        for r, res in zip(rows, results, strict=True)
    ]
    return pa.Table.from_pylist(answers, schema=ANSWER_SCHEMA), usage(results, teacher.model)
