import pytest

from lion_ray.errors import LionError
from lion_ray.logic.evaluation import Scored, markdown_table, read_questions, relative_scores


def test_relative_score_arithmetic_and_categories():
    rows = [
        Scored("writing", 8.0, 10.0),
        Scored("writing", 9.5, 9.0),
        Scored("math", 3.0, 9.0),
        Scored("math", 7.0, 7.0),
        Scored("math", None, 8.0),  # the judge's scores could not be read: left out, counted
    ]
    res = relative_scores(rows)
    o = res["overall"]
    assert o["relative_score"] == round(100 * (8 + 9.5 + 3 + 7) / (10 + 9 + 9 + 7), 2) == 78.57
    assert (o["wins"], o["ties"], o["losses"], o["scored"], o["unscored"]) == (1, 1, 2, 4, 1)
    assert res["by_category"]["writing"]["relative_score"] == round(100 * 17.5 / 19, 2)
    assert (
        res["by_category"]["math"]["relative_score"] == 62.5
        and res["by_category"]["math"]["unscored"] == 1
    )
    table = markdown_table(res, "demo")
    assert (
        "| math | 2/3 | 62.5% | 0 | 1 | 1 |" in table and "| **overall** | 4/5 | 78.6% |" in table
    )


def test_no_scored_rows_gives_no_score():
    assert relative_scores([Scored("a", None, None)])["overall"]["relative_score"] is None


def test_reads_vicuna_and_pool_formats():
    qs = read_questions(
        [
            (
                {
                    "question_id": 1,
                    "text": "How do I improve my time management?",
                    "category": "generic",
                },
                "q:1",
            ),
            ({"instruction": "Reverse 'kato'.", "family": "reverse"}, "q:2"),
            ({"instruction": "Summarize.", "input": "A long text."}, "q:3"),
        ]
    )
    assert [(q.id, q.category) for q in qs] == [
        ("1", "generic"),
        ("2", "reverse"),
        ("3", "general"),
    ]
    assert qs[2].input == "A long text."
    with pytest.raises(LionError, match="needs 'text'"):
        read_questions([({"prompt": "x"}, "q.jsonl:4")])
    with pytest.raises(LionError, match="must be unique; repeated: 7"):
        read_questions(
            [({"question_id": 7, "text": "a"}, "x"), ({"question_id": 7, "text": "b"}, "y")]
        )
