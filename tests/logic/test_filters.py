import pytest

from lion_ray.logic.filters import rejection_reason


@pytest.mark.parametrize(
    "text, finish, reason",
    [
        ("", "stop", "empty"),
        ("   \n ", "stop", "empty"),
        ("Write a poem about the sea and the sky", "length", "cut_off"),
        ("Write a poem", "stop", "too_short"),
        ("- Write a poem about the sea", "stop", "punctuation"),
        ('"Write a poem about the sea"', "stop", "punctuation"),
        ("Write a poem about the sea", "stop", None),
    ],
)
def test_reasons(text, finish, reason):
    assert rejection_reason(text, finish, min_words=4) == reason


def test_min_words_is_the_paper_rule():
    assert rejection_reason("one two three", "stop", 4) == "too_short"  # <= 3 words
    assert rejection_reason("one two three four", "stop", 4) is None
    assert rejection_reason("Reverse 'kato'.", "stop", 2) is None


def test_rejection_summary_counts_reasons_shows_examples_and_families():
    from lion_ray.logic.filters import rejection_summary

    def cand(text, reason="", nearest=None, similarity=None):
        return {
            "instruction": text,
            "accepted": reason == "",
            "reason": reason,
            "nearest": nearest,
            "similarity": similarity,
        }

    rows = [
        cand("Reverse the word 'kato'."),
        cand("Reverse the word 'kata'.", "similar_to_pool", "Reverse the word 'kato'.", 0.8),
        cand("Reverse the word 'kite'.", "similar_to_pool", "Reverse the word 'kato'.", 0.8),
        cand("Reverse the word 'kit'.", "similar_to_pool", "Reverse the word 'kato'.", 0.8),
        cand("Reverse the word 'ki'.", "similar_to_pool", "Reverse the word 'kato'.", 0.8),
        cand("Add 2 and 3.", "similar_to_accepted", "Add 2 and 4.", 0.75),
        cand("Hi", "too_short"),
        cand("Add 9 and 9.", "surplus"),  # never offered: not counted
    ]
    out = rejection_summary(rows, family_of=lambda t: t.split()[0].lower() if "'" in t else None)
    assert (out["candidates"], out["accepted"]) == (7, 1)
    assert out["rejected"] == {"too_short": 1, "similar_to_pool": 4, "similar_to_accepted": 1}
    assert list(out["rejected"]) == ["too_short", "similar_to_pool", "similar_to_accepted"]
    assert out["rejected_share"] == round(6 / 7, 3)
    assert len(out["examples"]["similar_to_pool"]) == 3  # the first three only
    assert out["examples"]["similar_to_accepted"] == [
        {"instruction": "Add 2 and 3.", "nearest": "Add 2 and 4.", "similarity": 0.75}
    ]
    assert out["examples"]["too_short"] == [{"instruction": "Hi"}]
    assert out["by_family"]["reverse"] == {
        "candidates": 5,
        "accepted": 1,
        "rejected": {"similar_to_pool": 4},
        "rejected_share": 0.8,
    }
    assert out["by_family"]["other"]["candidates"] == 2
    assert "by_family" not in rejection_summary(rows)
