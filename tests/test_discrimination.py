"""Discrimination: the algorithm with an in-process referee (milliseconds), then end to end
with the real engine against the sandbox over HTTP on a local Ray cluster."""

import json

from lion_ray.discrimination import judge, pair_answers
from lion_ray.logic.pools import import_records
from lion_ray.sandbox.tasks import generate_tasks
from lion_ray.sandbox.world import WorldOptions

from .conftest import sandbox_engine
from .fakes import WorldClient
from .helpers import answers_table


def _answers(pool, fn, status="ok"):
    return answers_table(
        [
            {"id": r["id"], "instruction": r["instruction"], "answer": fn(r), "status": status}
            for r in pool.to_pylist()
        ]
    )


def _setup(n=40, seed=0):
    tasks = generate_tasks(n, seed=seed)
    pool = import_records([(t.as_record(), "x") for t in tasks], source="t")[0]
    answers = {t.instruction: t.answer for t in tasks}
    teacher = _answers(pool, lambda r: answers[r["instruction"]])
    # the student gets about half the tasks right, the same half every run
    student = _answers(
        pool, lambda r: answers[r["instruction"]] if int(r["id"][:8], 16) % 2 else "wrong"
    )
    return pool, teacher, student, answers


def _check_split(judged, info, answers, n):
    rows = judged.to_pylist()
    for r in rows:
        assert r["status"] == "ok" and r["referee_calls"] == 2
        assert r["a_teacher"] == r["b_teacher"] == 10  # the same answer scores the same both ways
        right = r["student_answer"] == answers[r["instruction"]]
        assert r["label"] == ("easy" if right else "hard")
        assert r["gap"] == r["teacher_score"] - r["student_score"]
        assert "Score of the Assistant 2" in r["review_a"] or '"score_assistant_2"' in r["review_a"]
        assert r["review_b"]
    m = info["metrics"]
    wrong = sum(1 for r in rows if r["student_answer"] == "wrong")
    assert m["hard"] == wrong and m["hard_ratio"] == round(wrong / n, 4)
    assert m["order_consistency"] == 1.0 and m["parse_failure_rate"] == 0.0
    assert info["api"]["rows"] == 2 * n  # both orders of every row


def test_both_orders_split_and_metrics():
    pool, teacher, student, answers = _setup()
    referee = WorldClient()
    judged, info = judge(pair_answers(pool, teacher, student), referee, tau=1.0)
    _check_split(judged, info, answers, 40)
    # order A shows the teacher's answer first, order B the student's
    first = referee.asked[0]
    assert [r.request_id.rsplit(":", 1)[1] for r in first[:2]] == ["a", "b"]


def test_unparseable_reviews_are_reasked_then_marked_unparsed():
    pool, teacher, student, _ = _setup(30, seed=1)
    referee = WorldClient(options=WorldOptions(malformed_rate=0.4))
    judged, info = judge(pair_answers(pool, teacher, student), referee, max_reasks=3)
    assert info["metrics"]["referee_reasks"] > 0 and info["metrics"]["unparsed"] <= 2
    # every re-ask is a new request (a new seed), never the cached malformed review again
    assert len(referee.asked) > 1 and referee.asked[0][0].seed is None
    assert all(r.seed == k for k, wave in enumerate(referee.asked[1:], 1) for r in wave)
    always_bad = WorldClient(options=WorldOptions(malformed_rate=1.0))
    judged, info = judge(pair_answers(pool, teacher, student), always_bad, max_reasks=1)
    rows = judged.to_pylist()
    assert all(
        r["status"] == "unparsed" and r["label"] is None and r["teacher_score"] is None
        for r in rows
    )
    assert all(r["referee_calls"] == 4 for r in rows)  # 2 orders x (1 ask + 1 re-ask)
    m = info["metrics"]
    assert (m["unparsed"], m["judged"], m["parse_failure_rate"], m["hard"]) == (30, 0, 1.0, 0)


def test_failed_answers_are_excluded_and_counted():
    pool, teacher, _, _ = _setup(10, seed=2)
    failed_student = _answers(pool, lambda r: "", status="failed")
    referee = WorldClient()
    judged, info = judge(pair_answers(pool, teacher, failed_student), referee)
    assert info["metrics"]["failed"] == 10 and info["api"] == {} and referee.asked == []
    assert all(
        r["status"] == "failed" and "student answer failed" in r["error"]
        for r in judged.to_pylist()
    )


def test_end_to_end_and_rerun_from_cache(ray_local, sandbox, tmp_path):
    pool, teacher, student, answers = _setup(24, seed=3)
    pairs = pair_answers(pool, teacher, student)
    engine = sandbox_engine(sandbox, tmp_path, role="referee")
    first, info = judge(pairs, engine)
    _check_split(first, info, answers, 24)
    # where the student's answer is the teacher's, both orders are one prompt: paid once
    same = sum(r["teacher_answer"] == r["student_answer"] for r in pairs.to_pylist())
    assert 0 < same < 24
    assert info["api"]["cached"] == same and info["api"]["requests"] == 48 - same
    # a new engine on the same run directory (a resumed run) pays for nothing again
    second, info = judge(pairs, sandbox_engine(sandbox, tmp_path, role="referee"))
    assert info["api"]["cached"] == 48 and info["api"]["requests"] == 0 and first.equals(second)


def test_structured_output_is_asked_for_and_read_first(ray_local, sandbox, tmp_path):
    pool, teacher, student, answers = _setup(12, seed=5)
    pairs = pair_answers(pool, teacher, student)
    referee = WorldClient()
    judged, info = judge(pairs, referee, structured=True)
    assert all(r.response_format["type"] == "json_schema" for r in referee.asked[0])
    assert all(r["review_a"].startswith("{") for r in judged.to_pylist())
    _check_split(judged, info, answers, 12)
    # the same against the sandbox over HTTP, through the engine
    judged, info = judge(pairs, sandbox_engine(sandbox, tmp_path, role="referee"), structured=True)
    assert json.loads(judged.to_pylist()[0]["review_b"])["score_assistant_1"] in range(1, 11)
    _check_split(judged, info, answers, 12)


def test_a_cut_off_json_review_is_asked_again():
    pool, teacher, student, _ = _setup(20, seed=6)
    referee = WorldClient(options=WorldOptions(malformed_rate=0.3))
    judged, info = judge(pair_answers(pool, teacher, student), referee, structured=True)
    assert info["metrics"]["referee_reasks"] > 0 and info["metrics"]["unparsed"] <= 1


def test_a_referee_that_cannot_judge_fails_the_stage_with_its_replies():
    """Above loop.referee_max_unparsed_fraction, discrimination fails instead of a round
    with no hard and no easy instruction; the message names the model, the share, two of
    its replies and what to change."""
    import pytest

    from lion_ray.discrimination import RefereeCannotJudge, check_reviews

    pool, teacher, student, _ = _setup(20, seed=2)
    pairs = pair_answers(pool, teacher, student)
    judged, _ = judge(pairs, WorldClient(options=WorldOptions(malformed_rate=1.0)), max_reasks=1)
    with pytest.raises(RefereeCannotJudge) as caught:
        check_reviews(judged, "tiny-judge", 0.2)
    message = str(caught.value)
    assert "the referee (tiny-judge) gave no readable score for 20 of 20 pairs (100%)" in message
    assert "Two of its replies: '" in message and "referee.structured_output" in message
    some = WorldClient(options=WorldOptions(malformed_rate=0.1))
    check_reviews(judge(pairs, some, max_reasks=2)[0], "m", 0.2)  # a few: the round goes on
