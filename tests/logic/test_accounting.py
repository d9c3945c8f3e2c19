import pytest

from lion_ray.logic.accounting import fold_ledger
from lion_ray.logic.chat import ChatResult, merge_usage, usage


def test_settled_reservations_count_their_real_cost():
    t = fold_ledger(
        {
            "a.jsonl": [
                {"t": "1", "w": 0.5, "s": "round_1/imitation.teacher"},
                {"t": "2", "w": 0.5, "s": "round_1/imitation.teacher"},
                {"t": "1", "a": 0.1, "s": "round_1/imitation.teacher"},
                {"t": "2", "a": 0.0, "s": "round_1/imitation.teacher"},  # a 5xx: not billed
            ]
        }
    )
    assert t.spent_usd == pytest.approx(0.1) and t.open_tickets == 0
    assert t.by_stage == {"round_1/imitation.teacher": pytest.approx(0.1)}


def test_a_request_in_flight_at_a_crash_counts_at_its_worst_case():
    t = fold_ledger({"a.jsonl": [{"t": "1", "w": 0.5, "s": "x"}, {"t": "2", "w": 0.25, "s": "y"}]})
    assert t.spent_usd == pytest.approx(0.75) and t.open_usd == pytest.approx(0.75)
    assert t.open_tickets == 2 and t.spent_by_stage() == {"x": 0.5, "y": 0.25}


def test_a_snapshot_stands_for_the_files_it_replaces():
    files = {
        "old.jsonl": [{"t": "1", "w": 0.5, "s": "x"}, {"t": "1", "a": 0.2, "s": "x"}],
        "snapshot-b.jsonl": [
            {
                "snapshot": True,
                "replaces": ["old.jsonl"],
                "settled_usd": 0.2,
                "by_stage": {"x": 0.2},
            }
        ],
        "c.jsonl": [{"t": "9", "w": 0.1, "s": "z"}, {"t": "9", "a": 0.05, "s": "z"}],
    }
    # a crash between writing the snapshot and deleting old.jsonl counts it once
    t = fold_ledger(files)
    assert t.spent_usd == pytest.approx(0.25) and t.by_stage == {"x": 0.2, "z": 0.05}


def test_an_open_reservation_survives_a_snapshot_until_it_settles():
    """A batch submitted before a crash is still open in the snapshot; read back later, its
    real cost replaces its worst case, once even if it is read back twice."""
    files = {
        "snapshot-a.jsonl": [
            {"snapshot": True, "replaces": [], "settled_usd": 1.0, "open": {"b1": [0.5, "x"]}}
        ],
        "b.jsonl": [{"t": "b1", "a": 0.2, "s": "x"}, {"t": "b1", "a": 0.2, "s": "x"}],
    }
    t = fold_ledger(files)
    assert t.spent_usd == pytest.approx(1.2) and t.open_tickets == 0
    assert fold_ledger({"snapshot-a.jsonl": files["snapshot-a.jsonl"]}).spent_usd == 1.5


def test_usage_counts_paid_and_cached_separately():
    results = [
        ChatResult(
            "a", "x", "stop", "ok", attempts=2, prompt_tokens=10, completion_tokens=2, cost_usd=0.3
        ),
        ChatResult("b", "y", "stop", "ok", cached=True, prompt_tokens=10, completion_tokens=2),
        ChatResult("c", status="failed", attempts=3, error="500"),
        ChatResult("d", status="budget"),
    ]
    u = usage(results, "m")
    assert (u["rows"], u["ok"], u["failed"], u["budget"], u["cached"]) == (4, 2, 1, 1, 1)
    assert (u["requests"], u["prompt_tokens"], u["cost_usd"]) == (5, 10, 0.3)
    both = merge_usage(u, u, {})
    assert both["rows"] == 8 and both["cost_usd"] == 0.6 and both["model"] == "m"
