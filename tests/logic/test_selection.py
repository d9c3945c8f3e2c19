"""Selection by the student's loss, and the config that picks a selection."""

from __future__ import annotations

import pytest

from lion_ray.config import ConfigError, LoopConfig, parse_config
from lion_ray.discrimination import JUDGED_SCHEMA, pair_answers, split_by_loss, unjudged
from lion_ray.logic.selection import label_by_loss, loss_metrics


def test_the_hardest_fraction_by_loss_is_hard():
    losses = {"a": 0.5, "b": 3.0, "c": 1.0, "d": 2.0, "e": None, "f": float("nan")}
    labels = label_by_loss(losses, 0.5)
    assert labels == {"a": "easy", "b": "hard", "c": "easy", "d": "hard", "e": None, "f": None}
    m = loss_metrics(losses | {"f": None}, labels)
    assert (m["judged"], m["hard"], m["easy"], m["failed"], m["hard_ratio"]) == (4, 2, 2, 2, 0.5)
    assert m["mean_hard_loss"] == 2.5 and m["mean_easy_loss"] == 0.75


def test_ties_break_by_id_so_reruns_agree():
    losses = {k: 1.0 for k in "dcba"}
    assert label_by_loss(losses, 0.5) == {"a": "hard", "b": "hard", "c": "easy", "d": "easy"}
    with pytest.raises(ValueError):
        label_by_loss(losses, 1.0)


def _pool(n: int):
    import pyarrow as pa

    return pa.Table.from_pylist(
        [{"id": str(i), "instruction": f"task {i}", "input": ""} for i in range(n)]
    )


def _teacher(n: int, failed=()):
    import pyarrow as pa

    return pa.Table.from_pylist(
        [
            {
                "id": str(i),
                "answer": f"answer {i}",
                "status": "failed" if i in failed else "ok",
                "error": "boom" if i in failed else "",
            }
            for i in range(n)
        ]
    )


def test_split_by_loss_writes_the_judged_table_and_fails_rows_it_cannot_score():
    pairs = pair_answers(_pool(5), _teacher(5, failed={4}), None)
    assert pairs.column("upstream_error").to_pylist()[:4] == [""] * 4  # no student side
    losses = {"0": 0.1, "1": 0.9, "2": 0.5, "3": None}
    judged, info = split_by_loss(pairs, losses, 0.34)
    assert judged.schema == JUDGED_SCHEMA
    rows = {r["id"]: r for r in judged.to_pylist()}
    assert rows["1"]["label"] == "hard" and rows["0"]["label"] == rows["2"]["label"] == "easy"
    assert rows["3"]["status"] == "failed" and rows["3"]["error"] == "no student loss"
    assert rows["4"]["status"] == "failed" and "teacher answer failed" in rows["4"]["error"]
    assert rows["1"]["student_loss"] == 0.9 and rows["1"]["teacher_answer"] == "answer 1"
    assert info["api"] == {} and info["metrics"]["hard"] == 1 and info["metrics"]["failed"] == 2


def test_random_selection_labels_nothing_and_asks_nothing():
    judged, info = unjudged(_pool(3))
    assert [r["label"] for r in judged.to_pylist()] == [None] * 3
    assert {r["status"] for r in judged.to_pylist()} == {"ok"} and info["api"] == {}


def test_selection_config_and_its_old_name():
    assert LoopConfig().selection == "referee"
    assert LoopConfig(parent_selection="lion").selection == "referee"
    assert LoopConfig(parent_selection="random").selection == "random"
    assert LoopConfig(selection="student_loss", hard_fraction=0.3).hard_fraction == 0.3
    with pytest.raises(ConfigError, match="loop.selection"):
        parse_config("loop: {selection: loss}", "x.yaml")
    with pytest.raises(ConfigError, match="hard_fraction"):
        parse_config("loop: {selection: student_loss, hard_fraction: 1.5}", "x.yaml")
    with pytest.raises(ConfigError, match="old name"):
        parse_config("loop: {selection: random, parent_selection: lion}", "x.yaml")
