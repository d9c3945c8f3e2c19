from lion_ray.logic.timing import union_seconds


def test_overlapping_intervals_count_once():
    assert union_seconds([]) == 0
    assert union_seconds([(0, 2), (1, 3), (5, 6)]) == 4  # [0, 3] and [5, 6]
    assert union_seconds([(5, 6), (0, 10)]) == 10  # nested, in any order
    assert union_seconds([(0, 1), (1, 2)]) == 2  # touching
