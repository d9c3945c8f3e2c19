"""Selection by the student's loss, and the config that picks a selection."""

from __future__ import annotations

import pytest

from lion_ray.config import ConfigError, LoopConfig, parse_config
from lion_ray.discrimination import JUDGED_SCHEMA, pair_answers, split_by_loss, unjudged
from lion_ray.logic.selection import label_by_loss, learnability_scores, loss_metrics


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


def test_learnability_prefers_what_still_moves_over_the_known_and_the_stuck():
    now = {"learning": 2.0, "known": 0.2, "stuck": 3.0, "worse": 2.5, "new": 1.5, "gone": None}
    before = {"learning": 4.0, "known": 0.4, "stuck": 3.0, "worse": 2.0, "gone": 1.0}
    scores = learnability_scores(now, before)
    # L * clip((L_prev - L) / L_prev, 0, 1)
    assert scores["learning"] == pytest.approx(2.0 * 0.5)
    assert scores["known"] == pytest.approx(0.2 * 0.5)
    assert scores["stuck"] == 0.0 and scores["worse"] == 0.0  # no progress: not learnable now
    # no previous loss: the median progress of the rest (0, 0, 0.5, 0.5 -> 0.25)
    assert scores["new"] == pytest.approx(1.5 * 0.25)
    assert scores["gone"] is None
    labels = label_by_loss(scores, 0.4)
    assert [k for k, v in labels.items() if v == "hard"] == ["learning", "new"]
    # student_loss would have picked the stuck and the regressed ones
    by_loss = label_by_loss(now, 0.4)
    assert [k for k, v in by_loss.items() if v == "hard"] == ["stuck", "worse"]


def test_learnability_without_history_is_the_loss_order():
    now = {"a": 0.5, "b": 3.0, "c": 1.0, "d": float("nan")}
    scores = learnability_scores(now, {"b": float("nan"), "c": 0.0})  # nothing usable
    assert scores == {"a": 0.5, "b": 3.0, "c": 1.0, "d": None}
    assert label_by_loss(scores, 0.5) == label_by_loss(now, 0.5)


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


def test_split_by_learnability_keeps_both_scores_and_counts_the_history():
    pairs = pair_answers(_pool(4), _teacher(4), None)
    losses = {"0": 2.0, "1": 3.0, "2": 0.5, "3": 1.0}
    judged, info = split_by_loss(pairs, losses, 0.5, previous={"0": 4.0, "1": 3.0, "2": 1.0})
    rows = {r["id"]: r for r in judged.to_pylist()}
    assert [rows[k]["learnability"] for k in "012"] == [1.0, 0.0, 0.25]
    assert rows["3"]["learnability"] == 0.5  # no history: the median progress, 0.5
    assert {k for k, r in rows.items() if r["label"] == "hard"} == {"0", "3"}
    assert rows["1"]["student_loss"] == 3.0 and rows["1"]["label"] == "easy"
    assert info["metrics"]["with_previous_loss"] == 3
    assert info["metrics"]["mean_learnability_hard"] == 0.75
    plain, _ = split_by_loss(pairs, losses, 0.5)
    assert plain.column("learnability").to_pylist() == [None] * 4


def test_random_selection_labels_nothing_and_asks_nothing():
    judged, info = unjudged(_pool(3))
    assert [r["label"] for r in judged.to_pylist()] == [None] * 3
    assert {r["status"] for r in judged.to_pylist()} == {"ok"} and info["api"] == {}


def test_selection_config_and_its_old_name():
    assert LoopConfig().selection == "referee"
    assert LoopConfig(parent_selection="lion").selection == "referee"
    assert LoopConfig(parent_selection="random").selection == "random"
    assert LoopConfig(selection="student_loss", hard_fraction=0.3).hard_fraction == 0.3
    assert LoopConfig(selection="learnability").selection == "learnability"
    assert LoopConfig().similarity == "rouge_l"
    assert LoopConfig(similarity="same_payload").similarity == "same_payload"
    with pytest.raises(ConfigError, match="loop.similarity"):
        parse_config("loop: {similarity: minhash}", "x.yaml")
    with pytest.raises(ConfigError, match="loop.selection"):
        parse_config("loop: {selection: loss}", "x.yaml")
    with pytest.raises(ConfigError, match="hard_fraction"):
        parse_config("loop: {selection: student_loss, hard_fraction: 1.5}", "x.yaml")
    with pytest.raises(ConfigError, match="old name"):
        parse_config("loop: {selection: random, parent_selection: lion}", "x.yaml")
