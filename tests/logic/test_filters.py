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
