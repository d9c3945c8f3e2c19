"""Discrimination against the sandbox referee over real HTTP, on a local Ray cluster."""

import pyarrow as pa

from lion_ray.discrimination import judge, pair_answers
from lion_ray.logic.pools import ANSWER_SCHEMA, import_records
from lion_ray.sandbox.server import SandboxProcess, ServerOptions
from lion_ray.sandbox.tasks import generate_tasks

from .conftest import sandbox_endpoint


def _answers(pool, fn, status="ok"):
    rows = []
    for r in pool.to_pylist():
        rows.append(
            {
                "id": r["id"],
                "instruction": r["instruction"],
                "input": "",
                "answer": fn(r),
                "status": status if callable(status) is False else status(r),
                "error": "",
                "finish_reason": "stop",
                "prompt_tokens": 1,
                "completion_tokens": 1,
                "cost_usd": 0.0,
                "cached": False,
            }
        )
    return pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA)


def _setup(n=40, seed=0):
    tasks = generate_tasks(n, seed=seed)
    pool = import_records([(t.as_record(), "x") for t in tasks], source="t")[0]
    answers = {t.instruction: t.answer for t in tasks}
    teacher = _answers(pool, lambda r: answers[r["instruction"]])
    # the student gets every other task right
    student = _answers(pool, lambda r: answers[r["instruction"]] if hash(r["id"]) % 2 else "wrong")
    return pool, teacher, student, answers


def test_both_orders_split_and_metrics(ray_local, sandbox, tmp_path):
    pool, teacher, student, answers = _setup()
    judged, info = judge(
        pair_answers(pool, teacher, student),
        sandbox_endpoint(sandbox),
        cache_dir=str(tmp_path / "c"),
        tau=1.0,
        show_progress=False,
    )
    rows = judged.to_pylist()
    for r in rows:
        assert r["status"] == "ok" and r["referee_calls"] == 2
        assert (
            r["a_teacher"] == r["b_teacher"] == 10
        )  # the same answer scores the same in both orders
        right = r["student_answer"] == answers[r["instruction"]]
        assert r["label"] == ("easy" if right else "hard")
        assert r["gap"] == r["teacher_score"] - r["student_score"]
        assert "Score of the Assistant 2" in r["review_a"] and r["review_b"]
    m = info["metrics"]
    wrong = sum(1 for r in rows if r["student_answer"] == "wrong")
    assert m["hard"] == wrong and m["hard_ratio"] == round(wrong / 40, 4)
    assert m["order_consistency"] == 1.0 and m["parse_failure_rate"] == 0.0
    assert info["api"]["rows"] == 80  # both orders of every row


def test_unparseable_reviews_are_reasked_then_marked_unparsed(ray_local, tmp_path):
    pool, teacher, student, _ = _setup(30, seed=1)
    with SandboxProcess(ServerOptions(malformed_rate=0.4)) as sb:
        judged, info = judge(
            pair_answers(pool, teacher, student),
            sandbox_endpoint(sb),
            cache_dir=str(tmp_path / "c"),
            max_reasks=3,
            show_progress=False,
        )
        assert info["metrics"]["referee_reasks"] > 0 and info["metrics"]["unparsed"] <= 2
        assert sb.stats()["malformed"] > 0
    with SandboxProcess(ServerOptions(malformed_rate=1.0)) as sb:
        judged, info = judge(
            pair_answers(pool, teacher, student),
            sandbox_endpoint(sb),
            cache_dir=str(tmp_path / "c2"),
            max_reasks=1,
            show_progress=False,
        )
    rows = judged.to_pylist()
    assert all(
        r["status"] == "unparsed" and r["label"] is None and r["teacher_score"] is None
        for r in rows
    )
    assert all(r["referee_calls"] == 4 for r in rows)  # 2 orders x (1 ask + 1 re-ask)
    m = info["metrics"]
    assert (
        m["unparsed"] == 30
        and m["judged"] == 0
        and m["parse_failure_rate"] == 1.0
        and m["hard"] == 0
    )


def test_failed_answers_are_excluded_and_counted(ray_local, sandbox, tmp_path):
    pool, teacher, student, _ = _setup(10, seed=2)
    failed_student = _answers(pool, lambda r: "", status="failed")
    judged, info = judge(
        pair_answers(pool, teacher, failed_student),
        sandbox_endpoint(sandbox),
        cache_dir=str(tmp_path / "c"),
        show_progress=False,
    )
    assert info["metrics"]["failed"] == 10 and info["api"] == {}
    assert all(
        r["status"] == "failed" and "student answer failed" in r["error"]
        for r in judged.to_pylist()
    )


def test_rerun_is_served_from_cache(ray_local, sandbox, tmp_path):
    pool, teacher, student, _ = _setup(12, seed=3)
    pairs = pair_answers(pool, teacher, student)
    first, _ = judge(
        pairs, sandbox_endpoint(sandbox), cache_dir=str(tmp_path / "c"), show_progress=False
    )
    second, info = judge(
        pairs, sandbox_endpoint(sandbox), cache_dir=str(tmp_path / "c"), show_progress=False
    )
    assert info["api"]["cached"] == 24 and first.equals(second)
