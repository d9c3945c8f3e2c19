"""Stages that stream: a pool is read and written a window at a time, a killed stage keeps
the windows it finished, the response cache answers by point lookups from an index that
reads only new shards, and dedup's index grows with each round's additions."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from lion_ray import storage

from .helpers import until


def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"id": [f"{i:06d}" for i in range(start, start + n)], "x": list(range(n))})


def test_windows_are_exact_whatever_the_row_groups(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(_table(1000), path, row_group_size=37)  # row groups across windows
    windows = list(storage.iter_windows(str(path), 300, ["id"]))
    assert [w.num_rows for w in windows] == [300, 300, 300, 100]
    assert windows[0].column_names == ["id"]
    assert sum((w.column("id").to_pylist() for w in windows), []) == _table(1000)["id"].to_pylist()
    assert storage.count_rows(str(path)) == 1000


def test_a_windowed_output_keeps_finished_windows_and_drops_another_plans(tmp_path):
    out = str(tmp_path / "answers.parquet")
    plan = {"window_rows": 10, "inputs": {"pool": "sha256:a"}}
    first = storage.WindowedOutput(out, plan)
    first.write(0, _table(10), {"cost": 1})
    first.write(1, _table(10, 10), {"cost": 2})  # then the stage is killed
    again = storage.WindowedOutput(out, plan)
    assert again.done(0) and again.done(1) and not again.done(2)
    again.write(2, _table(5, 20), {"cost": 3})
    rows, infos = again.finish(3)
    assert rows == 25 and infos == [{"cost": 1}, {"cost": 2}, {"cost": 3}]
    assert storage.read_parquet(out)["id"].to_pylist() == _table(25)["id"].to_pylist()
    assert not storage.exists(out + ".parts")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.parquet"]  # nothing left
    stale = storage.WindowedOutput(out, plan)
    stale.write(0, _table(10), {})
    other = storage.WindowedOutput(out, {"window_rows": 10, "inputs": {"pool": "sha256:b"}})
    assert not other.done(0)  # parts of another input are not reused


def test_windows_whose_inputs_are_not_row_aligned_stop_the_stage():
    from lion_ray.driver import _check_aligned

    pool, same = _table(5), _table(5)
    _check_aligned("round_1/discrimination.referee", 0, {"pool": pool, "teacher": same})
    shuffled = same.take([1, 0, 2, 3, 4])
    with pytest.raises(ValueError, match=r"window 3: student's rows are not pool's rows"):
        _check_aligned("round_1/x", 2, {"pool": pool, "teacher": same, "student": shuffled})


def _stage(tmp_path, rows: int, window_rows: int, **overrides):
    """A Driver stand-in with what the windowed stages read (config, an io of a pool)."""
    from types import SimpleNamespace

    from lion_ray.config import load_config
    from lion_ray.driver import StageIO

    pool = str(tmp_path / "pool.parquet")
    storage.write_parquet(pool, _table(rows))
    sets = [f"storage.window_rows={window_rows}"] + [f"{k}={v}" for k, v in overrides.items()]
    io = StageIO("round_1/x", 1, {"pool": pool}, {"answers": str(tmp_path / "answers.parquet")})
    return SimpleNamespace(cfg=load_config(overrides=sets), show_progress=False), io


def test_a_rejected_output_is_neither_written_nor_kept_for_the_rerun(tmp_path):
    """A check that rejects the stage's output (too many failed rows) runs before the
    output is written, and drops the parts: a rerun after the fix redoes every window
    instead of reusing the failed ones. Any other error keeps the finished windows."""
    from lion_ray.driver import Driver
    from lion_ray.engines.inference import StudentEngineError

    stub, io = _stage(tmp_path, 250, 100)
    calls: list[int] = []

    def work(i, windows, pool, fail_at=None):
        calls.append(i)
        if i == fail_at:
            raise fail_error
        return pool, {"failed": i}

    def reject(infos, parts):
        assert sum(p.num_rows for p in parts()) == 250  # the whole output, before it is written
        if sum(x["failed"] for x in infos) > 2:
            raise StudentEngineError("round_1/x: 3 of 250 rows failed")

    with pytest.raises(StudentEngineError):
        Driver.windowed(stub, io, "answers", ["pool"], work, check=reject)
    assert calls == [0, 1, 2]
    assert not storage.exists(io.outputs["answers"]) and not storage.exists(
        io.outputs["answers"] + ".parts"
    )
    fail_error = RuntimeError("the engine went away")  # not a verdict: the windows stay
    with pytest.raises(RuntimeError):
        Driver.windowed(stub, io, "answers", ["pool"], lambda *a: work(*a, fail_at=2))
    fail_error = StudentEngineError("too many failed already")  # a verdict mid-stage
    calls.clear()
    with pytest.raises(StudentEngineError):
        Driver.windowed(stub, io, "answers", ["pool"], lambda *a: work(*a, fail_at=2))
    assert calls == [2]  # windows 0 and 1 were reused from the attempt before...
    calls.clear()
    rows, infos = Driver.windowed(stub, io, "answers", ["pool"], work)
    assert calls == [0, 1, 2] and rows == 250  # ...but not after a verdict
    assert [x["failed"] for x in infos] == [0, 1, 2]


def test_the_loss_split_checks_the_stages_failed_share_not_each_windows(tmp_path, monkeypatch):
    """One failed loss in a 50-row last window is 2% of that window but 0.4% of the stage:
    with max_failed_fraction 0.01 the stage goes on; with four failures it stops."""
    from lion_ray.driver import Driver
    from lion_ray.engines import inference
    from lion_ray.engines.inference import StudentEngineError
    from lion_ray.logic.pools import ANSWER_SCHEMA, POOL_SCHEMA

    stub, io = _stage(tmp_path, 250, 100)
    ids = _table(250)["id"].to_pylist()
    pool = {c: [""] * 250 for c in POOL_SCHEMA.names} | {"id": ids, "round": [0] * 250}
    teacher = {c: [""] * 250 for c in ANSWER_SCHEMA.names} | {"id": ids, "status": ["ok"] * 250}
    teacher |= {"answer": ["a"] * 250, "prompt_tokens": [1] * 250, "completion_tokens": [1] * 250}
    teacher |= {"cost_usd": [0.0] * 250, "cached": [False] * 250}
    io.inputs |= {"pool": str(tmp_path / "pool.parquet"), "teacher": str(tmp_path / "t.parquet")}
    io.inputs["model"] = "unused"
    io.outputs = {"judged": str(tmp_path / "judged.parquet")}
    storage.write_parquet(io.inputs["pool"], pa.Table.from_pydict(pool, schema=POOL_SCHEMA))
    storage.write_parquet(io.inputs["teacher"], pa.Table.from_pydict(teacher, schema=ANSWER_SCHEMA))
    failing: set[str] = {ids[-1]}

    def losses(rows, student, *, check=True, **_):
        got = {r["id"]: (None if r["id"] in failing else 1.0 + len(r["id"])) for r in rows}
        failed = sum(v is None for v in got.values())
        if check:
            inference.check_failures("w", len(rows), failed, "boom", student)
        info = {"rows": len(rows), "failed": failed, "first_error": "boom" if failed else ""}
        return got, info | {"errors": ["boom"] if failed else [], "wall_s": 0.0}

    monkeypatch.setattr(inference, "student_losses", losses)
    stub.student_engine = lambda model: None
    stub.run = type("Run", (), {"relative": staticmethod(lambda uri: uri)})()
    result = Driver.loss_split(stub, io)
    assert result.rows == 250 and storage.count_rows(io.outputs["judged"]) == 250
    failing |= set(ids[-4:-1])
    with pytest.raises(StudentEngineError, match="4 of 250 rows failed"):
        Driver.loss_split(stub, io)


def _entries(keys, text="t"):
    return [
        {
            "key": k,
            "text": f"{text}-{k}",
            "finish_reason": "stop",
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "cost_usd": 0.01,
        }
        for k in keys
    ]


def test_the_cache_index_reads_only_new_shards_and_answers_by_key(tmp_path):
    from lion_ray.engines.cache import CacheIndex, compact

    cache = tmp_path / "cache" / "teacher"
    cache.mkdir(parents=True)

    def shard(name, keys):
        (cache / name).write_text("".join(json.dumps(e) + "\n" for e in _entries(keys)))

    shard("w1-000001.jsonl", ["a", "b"])
    index = CacheIndex(str(cache))
    assert len(index) == 2 and index.get_many(["a", "zz"]) == {
        "a": {k: v for k, v in _entries(["a"])[0].items() if k != "key"}
    }
    shard("w1-000002.jsonl", ["c"])
    assert index.refresh() == 1 and index.refresh() == 0  # only what is new
    index.put(_entries(["d"]))  # an answer the driver just got
    assert set(index.get_many(["a", "b", "c", "d"])) == {"a", "b", "c", "d"}
    index.close()
    reopened = CacheIndex(str(cache))  # a resumed run: the index on disk, nothing re-read
    assert reopened.refresh() == 0 and len(reopened) == 4
    for k in range(70):
        shard(f"w2-{k:06d}.jsonl", [f"k{k}"])
    assert compact(str(cache), index=reopened) == 72  # the small shards, merged once
    names = sorted(p.name for p in cache.glob("*.jsonl"))
    assert len(names) == 1 and names[0].startswith("compact-")
    assert reopened.refresh() == 0 and len(reopened) == 74  # the merged shard is not re-read
    assert reopened.db.execute("SELECT COUNT(*) FROM shards").fetchone()[0] == 1  # kept small
    shard("w3-000001.jsonl", ["late"])
    big = cache / "prefill-00000.jsonl"  # a large shard (a bulk import) is left as it is
    big.write_text("".join(json.dumps(e) + "\n" for e in _entries(range(8000), "x" * 150)))
    assert compact(str(cache), min_shards=1, index=reopened) == 2  # the small ones only
    assert big.exists() and len(list(cache.glob("compact-*.jsonl"))) == 1
    reopened.close()
    # the run directory deleted and made again under the same URI (an object store's index
    # lives outside it): the index is rebuilt from the new cache, not trusted
    for old in cache.glob("*.jsonl"):
        old.unlink()
    shard("w9-000001.jsonl", ["new"])
    again = CacheIndex(str(cache))
    assert len(again) == 1 and set(again.get_many(["a", "new"])) == {"new"}


def test_the_dedup_index_grows_by_segments_with_the_same_decisions():
    """A round's additions are a new segment (merged with others of their size), not a
    rebuild of the whole index; the decisions are those of one index built at once."""
    from lion_ray.logic.dedup import RougeIndex
    from lion_ray.sandbox.tasks import generate_tasks

    texts = [t.instruction for t in generate_tasks(3000, seed=3)]
    probes = [t.instruction.replace("'", "") + " now" for t in generate_tasks(300, seed=4)]
    whole = RougeIndex.build(texts, 0.7)
    grown = RougeIndex.build(texts[:2400], 0.7)
    first = grown.segments[0]
    grown.extend(texts[2400:2700])
    assert grown.segments[0] is first  # the big segment is kept as it was
    for text in texts[2700:]:
        grown.add(text)  # one at a time, as accepted candidates are
    assert [whole.max_match(p) for p in probes] == [grown.max_match(p) for p in probes]
    assert any(whole.exceeds(p) for p in probes) and not all(whole.exceeds(p) for p in probes)


def test_parents_come_in_the_order_sorting_and_shuffling_the_rows_gave():
    import random

    from lion_ray.generation import ParentOrder

    judged = pa.table(
        {
            "id": [f"{i:04x}" for i in range(997, 0, -1)],
            "status": ["ok" if i % 13 else "failed" for i in range(997)],
            "label": ["hard" if i % 3 else "easy" for i in range(997)],
            "instruction": [f"text {i}" for i in range(997)],
            "input": [""] * 997,
        }
    )
    windows = [judged.slice(0, 400), judged.slice(400, 400), judged.slice(800)]
    order = ParentOrder(lambda: windows, "hard", "0:1:hard")
    rows = [r for r in judged.to_pylist() if r["status"] == "ok" and r["label"] == "hard"]
    expected = sorted(rows, key=lambda r: r["id"])
    random.Random("0:1:hard").shuffle(expected)
    got = order.rows(len(expected) + 5)  # cycling past the end
    assert [r["id"] for r in got] == [r["id"] for r in expected + expected[:5]]
    assert got[0]["instruction"] == expected[0]["instruction"]


@pytest.mark.slow
def test_a_streaming_api_stage_killed_at_100k_rows_resumes_without_paying_twice(tmp_path):
    """100,000 instructions, the teacher's answers cached for all but 3,000 (as a resumed
    large run has them): the driver is killed while imitation.teacher streams, then rerun.
    Every row is answered once in the output, and the sandbox is paid at most one window's
    in-flight requests twice."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import pyarrow.parquet as pq

    from bench.scale import prepare, settings

    from .conftest import ROOT

    prepare(tmp_path, 100_000, 3_000, roles=("teacher",))
    sets = [*settings(tmp_path, 100_000, 0), "storage.window_rows=1000"]
    sets += ["teacher.requests_per_minute=6000", "loop.rounds=1"]
    program = (
        "import sys; from lion_ray.config import load_config; from lion_ray.driver import "
        "Driver; from lion_ray.session import Session; from rich.console import Console\n"
        "cfg = load_config('demo', sys.argv[1:])\n"
        "with Session(cfg, show_progress=False, quiet=True) as s:\n"
        "    d = Driver(cfg, s, Console(), show_progress=False)\n"
        "    d.run_stages(None, d.setup_stages())\n"
        "    stages = d.round_stages(1, 'unused')\n"
        "    d.run_stages(1, [st for st in stages if st.name == 'imitation.teacher'])\n"
    )
    env = {**os.environ, "RAY_ADDRESS": ""}
    answers = tmp_path / "run" / "round_1" / "imitation" / "teacher.parquet"
    parts = answers.parent / "teacher.parquet.parts"
    first = subprocess.Popen(
        [sys.executable, "-c", program, *sets], cwd=ROOT, env=env, start_new_session=True
    )
    deadline = time.time() + 600
    while time.time() < deadline and len(list(parts.glob("part-*.parquet"))) < 3:
        assert first.poll() is None, "the stage ended before it could be killed"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    kept = len(list(parts.glob("part-*.parquet")))
    assert 3 <= kept < 100 and not answers.exists()
    rerun = subprocess.run(
        [sys.executable, "-c", program, *sets],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ids = pq.read_table(answers, columns=["id", "status"]).to_pydict()
    assert len(ids["id"]) == 100_000 == len(set(ids["id"])) and set(ids["status"]) == {"ok"}
    paid = [
        json.loads(line)["key"]
        for shard in (tmp_path / "run" / "cache" / "teacher").glob("*.jsonl")
        for line in shard.read_text().splitlines()
        if not shard.name.startswith("prefill-")
    ]
    assert len(set(paid)) == 3_000  # every live row was paid for
    assert len(paid) - len(set(paid)) <= 1000  # at most one window's requests twice
    assert not parts.exists()


def test_the_pool_index_actor_runs_beside_the_driver_and_comes_back_empty(ray_local, tmp_path):
    """With pools on the driver's disk the index runs on the driver's node, holding no CPU;
    killed, it restarts indexing nothing and refuses to answer, so the driver loads the
    pool again instead of passing every candidate."""
    import pyarrow as pa

    from lion_ray.engines.dedup import IndexLost, PoolIndexActor

    pool = tmp_path / "cache.parquet"
    storage.write_parquet(
        str(pool), pa.table({"id": ["a", "b"], "instruction": ["Reverse 'kato'.", "Add 2 and 3."]})
    )
    index = PoolIndexActor(0.7, "rouge_l", local_files=True)
    try:
        assert index.load(str(pool), 10, "sha256:x") == 2 and index.covered() == "sha256:x"
        assert index.check(["Reverse 'kato' .", "Sort 9 1"], ["c", "b"]) == [
            (True, False),
            (False, True),
        ]
        ray_local.kill(index.handle, no_restart=False)
        until(lambda: _covered(index) is None, "the restarted, empty index", 60, 0.2)
        with pytest.raises(IndexLost, match="holds no pool"):
            index.check(["Sort 9 1"], ["c"])
        assert index.load(str(pool), 10, "sha256:x") == 2
        assert index.check(["Add 2 and 3 ."], ["d"]) == [(True, False)]
    finally:
        index.close()


def _covered(index) -> str | None | bool:
    """What the index covers; False while it is down or still the killed one."""
    from lion_ray.engines.dedup import IndexLost

    try:
        return index.covered()
    except IndexLost:
        return False


def test_an_index_that_holds_no_pool_refuses_to_judge(tmp_path):
    """An empty index (a restarted actor) neither answers nor takes a round's additions as
    if it held the pool they extend."""
    from lion_ray.engines.dedup import IndexLost, PoolIndex

    new = str(tmp_path / "new.parquet")
    storage.write_parquet(new, pa.table({"id": ["9"], "instruction": ["Add 2 and 3."]}))
    index = PoolIndex()
    with pytest.raises(IndexLost, match="holds None, not sha256:y"):
        index.add_file(new, 100, "sha256:z", "sha256:y")
    for ask in (lambda: index.check(["x"], ["1"]), lambda: index.nearest(["x"])):
        with pytest.raises(IndexLost):
            ask()
    index.extend([("1", "Reverse 'kato'.")], "sha256:y")
    assert index.check(["Reverse 'kato'."], ["2"]) == [(True, False)]
    assert index.add_file(new, 100, "sha256:z", "sha256:y") == 2
    assert index.check(["Add 2 and 3 ."], ["8"]) == [(True, False)]
