"""The spend ledger on disk: durable reservations, replay after a crash, the 0.1.0 import."""

import json

import pytest

from lion_ray.engines import ledger
from lion_ray.engines.cache import CacheWriter
from lion_ray.engines.ledger import SpendLedger


def test_replay_folds_a_dead_writer_into_one_snapshot(tmp_path):
    d = str(tmp_path / "spend" / "teacher")
    first = SpendLedger(d)
    assert first.open().spent_usd == 0.0
    first.append({"t": "1", "w": 0.5, "s": "round_1/imitation.teacher"})
    first.append({"t": "2", "w": 0.5, "s": "round_1/imitation.teacher"})
    first.commit()  # on disk before the request may be sent
    first.append({"t": "1", "a": 0.125, "s": "round_1/imitation.teacher"})
    first.commit()
    # the process dies with ticket 2 in flight; anyone reading sees the worst case
    assert ledger.load(d).spent_usd == pytest.approx(0.625)
    second = SpendLedger(d)
    assert second.open().spent_usd == pytest.approx(0.625)
    names = sorted(p.name for p in (tmp_path / "spend" / "teacher").iterdir())
    assert names == [f"snapshot-{second.instance}.jsonl"]
    second.append({"t": "3", "w": 0.25, "s": "round_1/generation"})
    second.append({"t": "3", "a": 0.25, "s": "round_1/generation"})
    second.commit()
    totals = ledger.load(d)
    # ticket 2 stays open at its worst case: nothing will ever say what it cost
    assert totals.spent_usd == pytest.approx(0.875) and totals.open_tickets == 1
    assert totals.spent_by_stage() == {
        "round_1/imitation.teacher": pytest.approx(0.625),
        "round_1/generation": pytest.approx(0.25),
    }


def test_a_torn_last_line_is_skipped(tmp_path):
    d = tmp_path / "spend"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"t": "1", "w": 0.5}) + "\n" + '{"t": "1", "a"')
    assert ledger.load(str(d)).spent_usd == pytest.approx(0.5)


def test_a_run_from_before_the_ledger_starts_from_what_it_paid(tmp_path):
    cache = str(tmp_path / "cache" / "teacher")
    writer = CacheWriter(cache)
    writer.add({"key": "a", "text": "x", "cost_usd": 0.25})
    writer.add({"key": "a", "text": "x", "cost_usd": 0.25})  # the same request, paid twice
    writer.add({"key": "b", "text": "y", "cost_usd": 0.5})
    writer.flush()
    assert ledger.legacy_spend(cache) == pytest.approx(1.0)
    assert ledger.legacy_spend(cache, recorded_usd=1.5) == pytest.approx(1.5)
    d = str(tmp_path / "spend" / "teacher")
    assert SpendLedger(d).open(legacy_usd=1.0).spent_usd == pytest.approx(1.0)
    assert ledger.load(d).spent_usd == pytest.approx(1.0)  # written down once
    assert SpendLedger(d).open(legacy_usd=1.0).spent_usd == pytest.approx(1.0)
