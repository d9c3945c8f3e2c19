"""Judge evaluation: a candidate student against a reference, scored by a judge in both orders.

    lion-ray eval --questions Q.jsonl --candidate runs/demo/round_3/imitation/model \
        --reference teacher --judge referee --out runs/demo/eval/round_3

The candidate's answers come from the student inference stage (or an answers file), the
reference's from the API engine (or a file), and the judge scores every pair twice, once in
each order, through the API engine (cached, rate limited). Outputs: ``eval.md`` (the table),
``eval.json``, ``by_category.png`` and the answers and reviews as Parquet.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa

from lion_ray import storage
from lion_ray.config import StudentConfig
from lion_ray.errors import LionError
from lion_ray.logic.chat import ChatClient
from lion_ray.logic.evaluation import (
    Question,
    Scored,
    markdown_table,
    read_questions,
    relative_scores,
)
from lion_ray.logic.pools import iter_records


def load_questions(uri: str) -> list[Question]:
    if not storage.exists(uri):
        raise LionError(f"{uri}: no such questions file")
    return read_questions(list(iter_records(storage.read_bytes(uri), uri)))


def load_answers(uri: str, questions: list[Question]) -> dict[str, str]:
    """Answers by question id from a Parquet/JSON(L) file with (question_id|id) and (answer|text)."""
    rows = [rec for rec, _ in iter_records(storage.read_bytes(uri), uri)]
    answers = {}
    for i, rec in enumerate(rows):
        qid = rec.get("question_id", rec.get("id"))
        text = rec.get("answer", rec.get("text"))
        if qid is None or text is None:
            raise LionError(f"{uri}: record {i} needs question_id (or id) and answer (or text)")
        answers[str(qid)] = text
    missing = [q.id for q in questions if q.id not in answers]
    if missing:
        raise LionError(f"{uri}: no answer for question ids {', '.join(missing[:5])}")
    return answers


def _pool(questions: list[Question]) -> pa.Table:
    return pa.table(
        {
            "id": [q.id for q in questions],
            "instruction": [q.text for q in questions],
            "input": [q.input for q in questions],
        }
    )


def answer_with_student(
    questions: list[Question], model_dir: str, student: StudentConfig
) -> dict[str, str]:
    from lion_ray.engines.inference import student_answers

    table, _ = student_answers(
        _pool(questions), student, model_uri=model_dir, label="candidate answers"
    )
    return dict(
        zip(table.column("id").to_pylist(), table.column("answer").to_pylist(), strict=True)
    )


def answer_with_endpoint(questions: list[Question], client: ChatClient) -> dict[str, str]:
    from lion_ray.imitation import teacher_answers

    table, summary = teacher_answers(_pool(questions), client, label="reference answers")
    if summary["failed"]:
        raise LionError(
            f"the reference endpoint failed on {summary['failed']} questions; rerun to retry them"
        )
    return dict(
        zip(table.column("id").to_pylist(), table.column("answer").to_pylist(), strict=True)
    )


def judge_pairs(
    questions: list[Question],
    candidate: dict[str, str],
    reference: dict[str, str],
    judge: ChatClient,
    max_reasks: int = 2,
    structured: bool = False,
) -> tuple[pa.Table, dict]:
    """Both orders per question. In the reviews, order A shows the reference first."""
    from lion_ray.discrimination import judge as judge_both_orders

    pairs = pa.table(
        {
            "id": [q.id for q in questions],
            "instruction": [q.text for q in questions],
            "input": [q.input for q in questions],
            "teacher_answer": [reference[q.id] for q in questions],
            "student_answer": [candidate[q.id] for q in questions],
        }
    )
    judged, info = judge_both_orders(
        pairs, judge, max_reasks=max_reasks, structured=structured, label="judge"
    )
    rows = {r["id"]: r for r in judged.to_pylist()}
    scored = [
        Scored(q.category, rows[q.id]["student_score"], rows[q.id]["teacher_score"])
        for q in questions
    ]
    result = relative_scores(scored) | {
        "api": info["api"],
        "order_consistency": info["metrics"]["order_consistency"],
    }
    return judged, result


def bar_chart(result: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(result["by_category"])
    values = [result["by_category"][c]["relative_score"] or 0 for c in cats]
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(cats) + 2), 3.2))
    ax.bar(cats, values, color="#4a7fb5")
    ax.axhline(100, color="#999", linestyle="--", linewidth=1)
    overall = result["overall"]["relative_score"] or 0
    ax.set(title=f"{title}: {overall:.1f}% of the reference overall", ylabel="relative score (%)")
    ax.tick_params(axis="x", rotation=30)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_outputs(
    out_dir: str,
    title: str,
    result: dict,
    judged: pa.Table,
    candidate: dict[str, str],
    reference: dict[str, str],
) -> str:
    table = markdown_table(result, title)
    storage.write_text(storage.join(out_dir, "eval.md"), table)
    storage.write_json(storage.join(out_dir, "eval.json"), {"title": title, **result})
    storage.write_bytes(storage.join(out_dir, "by_category.png"), bar_chart(result, title))
    storage.write_parquet(storage.join(out_dir, "judged.parquet"), judged)
    ids = list(candidate)
    storage.write_parquet(
        storage.join(out_dir, "answers.parquet"),
        pa.table(
            {
                "question_id": ids,
                "candidate": [candidate[i] for i in ids],
                "reference": [reference[i] for i in ids],
            }
        ),
    )
    return table


def summary_json(result: dict) -> str:
    overall = result["overall"]
    return json.dumps(
        {k: overall[k] for k in ("relative_score", "wins", "ties", "losses", "scored", "unscored")}
    )
