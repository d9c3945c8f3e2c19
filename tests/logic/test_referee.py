import pytest

from lion_ray.logic.referee import UnparseableReview, parse_scores, split_metrics, verdict


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Good.\nScore of the Assistant 1: 8\nScore of the Assistant 2: 6", (8, 6)),
        ("Score of the Assistant 1:   8  \n\nScore of the Assistant 2:\t6\n\n\nThanks!", (8, 6)),
        ("Score of the Assistant 1: 8/10\nScore of the Assistant 2: 6 / 10", (8, 6)),
        ("Score of the Assistant 1: 8 out of 10\nScore of the Assistant 2: 6 out of 10", (8, 6)),
        ("**Score of the Assistant 1:** 8\n**Score of the Assistant 2:** 6", (8, 6)),
        ("**Score of the Assistant 1: 8**\n**Score of the Assistant 2: 6**", (8, 6)),
        ("Score of the Assistant 1: 7.5\nScore of the Assistant 2: 6.25", (7.5, 6.25)),
        ("score of assistant 1: 9\nscore of assistant 2: 10", (9, 10)),
        ("Score for the Assistant 1 - 4\nScore for the Assistant 2 - 5", (4, 5)),
        # a mention in the discussion is not a score line
        (
            "Score of the Assistant 1: 3 would be unfair.\nScore of the Assistant 1: 9\nScore of the Assistant 2: 2",
            (9, 2),
        ),
        # Windows line endings, and old Mac ones
        ("Fine.\r\nScore of the Assistant 1: 8\r\nScore of the Assistant 2: 6\r\n", (8, 6)),
        ("Score of the Assistant 1: 8\rScore of the Assistant 2: 6", (8, 6)),
        # the same scores again in a closing summary
        (
            "Score of the Assistant 1: 8\nScore of the Assistant 2: 6\nIn short:\n"
            "Score of the Assistant 1: 8/10\nScore of the Assistant 2: 6",
            (8, 6),
        ),
    ],
)
def test_parser_accepts_common_variants(text, expected):
    assert parse_scores(text) == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty review"),
        ("Both answers are fine.", "no 'Score of the Assistant 1"),
        ("Score of the Assistant 1: 8", "no 'Score of the Assistant 2"),
        (
            "Score of the Assistant 1: excellent\nScore of the Assistant 2: 6",
            "no 'Score of the Assistant 1",
        ),
        ("Score of the Assistant 1: 11\nScore of the Assistant 2: 6", "outside 1..10"),
        ("Score of the Assistant 1: 0\nScore of the Assistant 2: 6", "outside 1..10"),
        ("Score of the Assistant 1: 4/5\nScore of the Assistant 2: 3/5", "not out of 10"),
        # both scores twice with different numbers: a judge that changed its mind
        (
            "Score of the Assistant 1: 8\nScore of the Assistant 2: 6\nOn reflection:\n"
            "Score of the Assistant 1: 5\nScore of the Assistant 2: 9",
            r"Assistant 1 is given different scores \(8 then 5\)",
        ),
        (
            "Score of the Assistant 1: 8\r\nScore of the Assistant 2: 6\r\n"
            "Score of the Assistant 1: 8\r\nScore of the Assistant 2: 7",
            r"Assistant 2 is given different scores \(6 then 7\)",
        ),
    ],
)
def test_parser_rejects_what_it_cannot_trust(text, reason):
    with pytest.raises(UnparseableReview, match=reason):
        parse_scores(text)


def test_verdict_averages_both_orders():
    # order A: teacher first; order B: student first
    v = verdict((9, 4), (5, 8), tau=1.0)
    assert (v.teacher_score, v.student_score, v.gap, v.label) == (8.5, 4.5, 4.0, "hard")
    assert v.consistent


def test_tau_boundary_and_position_bias():
    assert verdict((8, 7), (7, 8), tau=1.0).label == "hard"  # gap exactly tau is hard
    easy = verdict((8, 8), (9, 7.5), tau=1.0)  # gap 0.25
    assert easy.label == "easy"
    biased = verdict((9, 5), (9, 5), tau=1.0)  # the referee always prefers the first answer
    assert biased.gap == 0 and biased.label == "easy" and not biased.consistent


def test_unparsed_and_failed_never_get_scores():
    assert verdict(None, (8, 7), tau=1.0).status == "unparsed"
    v = verdict(None, None, tau=1.0, status="failed")
    assert v.status == "failed" and v.teacher_score is None and v.label is None


def test_split_metrics():
    vs = [
        verdict((9, 4), (4, 9), 1.0),
        verdict((8, 8), (8, 8), 1.0),
        verdict((9, 5), (9, 5), 1.0),
        verdict(None, None, 1.0),
        verdict(None, None, 1.0, status="failed"),
    ]
    m = split_metrics(vs)
    assert (m["rows"], m["judged"], m["hard"], m["easy"], m["unparsed"], m["failed"]) == (
        5,
        3,
        1,
        2,
        1,
        1,
    )
    assert m["hard_ratio"] == round(1 / 3, 4)
    assert m["order_consistency"] == round(2 / 3, 4)
    assert m["parse_failure_rate"] == 0.2
    assert m["mean_teacher_score"] == round((9 + 8 + 7) / 3, 4)


def _corpus():
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "data" / "referee_reviews.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("case", _corpus(), ids=lambda c: c["style"])
def test_reviews_as_real_judges_write_them_are_read_or_refused(case):
    """Every review is either read as the numbers its author meant or refused (re-asked,
    then `unparsed`); none is read as a wrong number."""
    if case["scores"] is None:
        with pytest.raises(UnparseableReview):
            parse_scores(case["text"])
    else:
        assert parse_scores(case["text"]) == tuple(case["scores"])
