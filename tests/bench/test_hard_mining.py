"""The registered ablation runs in parts: each finished (arm, seed) is a file, a recorded pair
is never run again, claims keep two processes off one pair, and the tables come from the
files alone."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from bench import hard_mining as hm

ROOT = Path(__file__).resolve().parents[2]


def _record(arm: str, seed: int, final: float, rounds: int = 2) -> dict:
    return {
        "arm": arm,
        "seed": seed,
        "size": "quick",
        "rounds": rounds,
        "commit": "abc",
        "accuracy_by_round": [0.1, final],
        "by_family": {"add": final},
        "by_difficulty": {"1": final},
        "added_by_family": {"add": 1.0},
        "added_by_difficulty": {"1": 1.0},
        "discrimination_requests": 10 if arm == "referee" else 0,
        "discrimination_usd": 0.01 if arm == "referee" else 0.0,
        "new_instructions": 90,
    }


def test_recorded_pairs_are_skipped_and_reported_without_running(tmp_path, monkeypatch):
    records = tmp_path / "records"
    for seed, (ref, rnd) in enumerate([(0.3, 0.2), (0.4, 0.3)]):
        hm.write_record(hm.record_path(records, "referee", seed), _record("referee", seed, ref))
        hm.write_record(hm.record_path(records, "random", seed), _record("random", seed, rnd))

    def no_engine(*args, **kwargs):
        raise AssertionError("a recorded pair started an engine")

    monkeypatch.setattr(hm, "start_engine", no_engine)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "hard_mining",
            "--quick",
            "--seeds",
            "2",
            "--arms",
            "referee,random",
            "--out",
            str(tmp_path / "out"),
            "--records",
            str(records),
        ],
    )
    printed = []
    monkeypatch.setattr("builtins.print", lambda line: printed.append(line))
    hm.main()
    summary = json.loads(printed[-1])
    assert summary["arms"]["referee"]["accuracy_mean"] == pytest.approx(0.35)
    assert summary["differences"]["referee-random"]["mean"] == pytest.approx(0.1)
    assert summary["differences"]["referee-random"]["seeds"] == 2
    assert "| referee | 2 |" in (tmp_path / "out" / "table.md").read_text()


def test_pairs_run_in_the_order_that_answers_the_main_question_first():
    assert hm.RUN_ORDER[:3] == ("referee", "learnability", "random")
    assert sorted(hm.RUN_ORDER) == sorted(hm.ARMS)


def test_a_record_of_another_size_is_refused_with_its_path(tmp_path):
    path = hm.record_path(tmp_path, "random", 0)
    hm.write_record(path, _record("random", 0, 0.2, rounds=3))
    with pytest.raises(SystemExit, match=r"random-seed0\.json.*3 rounds.*--records"):
        hm.read_record(path, "quick", 2)
    path.write_text("{half")
    with pytest.raises(SystemExit, match=r"random-seed0\.json: not a readable result"):
        hm.read_record(path, "quick", 2)


def test_arms_that_share_no_finished_seed_have_no_difference_yet():
    summary = hm.summarize(
        {"referee": {0: _record("referee", 0, 0.3)}, "random": {1: _record("random", 1, 0.2)}},
        rounds=2,
    )
    assert summary["differences"] == {}
    assert summary["arms"]["random"]["seeds"] == 1


def _hold(path: str, ready, release) -> None:
    with hm.claim(Path(path), wait=False) as mine:
        assert mine
        ready.set()
        release.wait(30)


def test_a_claim_keeps_a_second_process_off_a_pair_until_its_owner_dies(tmp_path):
    lock = tmp_path / "claims" / "random-seed0.lock"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    owner = ctx.Process(target=_hold, args=(str(lock), ready, release))
    owner.start()
    assert ready.wait(60)
    with hm.claim(lock, wait=False) as mine:
        assert not mine
    owner.kill()  # dies holding it: the kernel lets go
    owner.join(30)
    with hm.claim(lock, wait=False) as mine:
        assert mine


def test_the_commit_is_named_in_every_record():
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert hm.code_commit().startswith(head)
