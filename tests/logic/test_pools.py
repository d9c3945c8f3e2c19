import json

import pyarrow as pa
import pytest

from lion_ray.logic.pools import (
    POOL_SCHEMA,
    PoolFormatError,
    concat_pools,
    import_records,
    instruction_id,
    iter_records,
    load_pool_bytes,
    make_row,
    pool_stats,
    to_alpaca,
)


def _import(data: bytes, name: str):
    return load_pool_bytes(data, name)


def test_seed_tasks_import_with_provenance(seed_tasks_path):
    table, stats = _import(seed_tasks_path.read_bytes(), str(seed_tasks_path))
    assert table.schema == POOL_SCHEMA
    assert table.num_rows == 175 and stats.imported == 175 and stats.records == 175
    rows = table.to_pylist()
    assert {r["kind"] for r in rows} == {"seed"} and {r["round"] for r in rows} == {0}
    assert all(r["source"] == "alpaca_seed_tasks.jsonl" for r in rows)
    # self-instruct instances carry input and output through
    assert sum(1 for r in rows if r["input"]) == 125
    assert all(r["output"] for r in rows)


def test_ids_are_stable_and_whitespace_insensitive():
    a = instruction_id("Reverse  'abc'.\n", "")
    assert a == instruction_id(" Reverse 'abc'.", "")
    assert a != instruction_id("reverse 'abc'.", "")  # case matters (uppercase tasks)
    assert a != instruction_id("Reverse 'abc'.", "x")
    assert len(a) == 16


def test_duplicates_dropped_and_empty_skipped():
    lines = [
        {"instruction": "Say hi.", "input": ""},
        {"instruction": "Say  hi. "},
        {"instruction": "   "},
        {"instruction": "Add 2 and 3.", "output": "5"},
    ]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    table, stats = _import(data, "p.jsonl")
    assert table.num_rows == 2
    assert (stats.records, stats.duplicates, stats.empty, stats.imported) == (4, 1, 1, 2)


def test_malformed_jsonl_names_file_and_line():
    data = b'{"instruction": "ok"}\n\n{"instruction": "broken\n'
    with pytest.raises(PoolFormatError, match=r"^bad\.jsonl:3: invalid JSON"):
        _import(data, "bad.jsonl")


def test_malformed_json_array_names_line():
    data = b'[\n {"instruction": "a"},\n {"instruction": }\n]'
    with pytest.raises(PoolFormatError, match=r"^bad\.json:3: invalid JSON"):
        _import(data, "bad.json")


def test_record_without_instruction_is_named():
    data = b'{"instruction": "fine"}\n{"prompt": "nope", "answer": "x"}\n'
    with pytest.raises(
        PoolFormatError,
        match=r"p\.jsonl:2: record has no 'instruction' field \(fields: answer, prompt\)",
    ):
        _import(data, "p.jsonl")


def test_non_string_fields_refused():
    with pytest.raises(PoolFormatError, match=r"p\.jsonl:1: field 'input' must be a string"):
        _import(b'{"instruction": "a", "input": 3}\n', "p.jsonl")


def test_alpaca_json_array_and_parquet_roundtrip(tmp_path):
    records = [
        {"instruction": f"Task {i}", "input": "ctx" if i % 2 else "", "output": str(i)}
        for i in range(5)
    ]
    table, _ = _import(json.dumps(records).encode(), "a.json")
    assert to_alpaca(table) == records
    # a lion-ray parquet pool loads as is; a foreign parquet file is imported
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    again, _ = load_pool_bytes(buf.getvalue(), "pool.parquet")
    assert again.equals(table)
    foreign = io.BytesIO()
    pq.write_table(pa.table({"instruction": ["x y z", "x y z"], "output": ["1", "1"]}), foreign)
    imported, stats = load_pool_bytes(foreign.getvalue(), "foreign.parquet")
    assert imported.num_rows == 1 and stats.duplicates == 1


def test_concat_keeps_first_and_stats():
    seed = import_records([({"instruction": "A b c d"}, "x:1")], source="s")[0]
    new = pa.Table.from_pylist(
        [
            make_row("A b c d", source="gen", round_no=1, kind="hard", parent_id="p"),
            make_row("E f g h", source="gen", round_no=1, kind="easy", parent_id="p"),
        ],
        schema=POOL_SCHEMA,
    )
    both = concat_pools(seed, new)
    assert both.num_rows == 2
    assert both.column("kind").to_pylist() == ["seed", "easy"]
    stats = pool_stats(both)
    assert stats["by_kind"] == {"seed": 1, "easy": 1} and stats["by_round"] == {"0": 1, "1": 1}


def test_iter_records_refuses_non_utf8():
    with pytest.raises(PoolFormatError, match="not UTF-8"):
        list(iter_records(b"\xff\xfe{", "x.jsonl"))


def _rows(texts, kind="seed", round_no=0):
    return pa.Table.from_pylist(
        [make_row(t, source="s", kind=kind, round_no=round_no) for t in texts], schema=POOL_SCHEMA
    )


def test_next_pools_paper_policy():
    from lion_ray.logic.pools import next_pools

    seed = _rows([f"seed {i} a b" for i in range(5)])
    new = _rows(["new one a b c", "new two a b c"], kind="hard", round_no=1)
    train, cache = next_pools(seed, seed, new, "paper")
    assert train.column("instruction").to_pylist() == ["new one a b c", "new two a b c"]
    assert (
        cache.num_rows == 7 and cache.column("id").to_pylist()[:5] == seed.column("id").to_pylist()
    )
    train2, cache2 = next_pools(
        train, cache, _rows(["third x y z"], kind="easy", round_no=2), "paper"
    )
    assert train2.num_rows == 1 and cache2.num_rows == 8  # 5 -> 7 -> 8: the Cache Pool only grows


def test_next_pools_accumulate_policy():
    from lion_ray.logic.pools import next_pools

    seed = _rows(["a b c d", "e f g h"])
    new = _rows(["i j k l"], kind="hard", round_no=1)
    train, cache = next_pools(seed, seed, new, "accumulate")
    assert train.num_rows == 3 and cache.num_rows == 3
    with pytest.raises(ValueError, match="unknown pool policy"):
        next_pools(seed, seed, new, "other")


def test_a_process_that_read_a_parquet_pool_exits_cleanly(tmp_path, seed_tasks_path):
    """Arrow's reader threads once held the pool's Python bytes; about a third of the
    processes that read one then aborted at exit (SIGABRT, "terminate called without an
    active exception") after printing their answer, as `lion-ray pool stats` did in CI."""
    import subprocess
    import sys

    import pyarrow.parquet as pq

    table, _ = _import(seed_tasks_path.read_bytes(), str(seed_tasks_path))
    pool = tmp_path / "pool.parquet"
    pq.write_table(table, pool)
    program = (
        "import sys; from lion_ray.logic.pools import load_pool_bytes; "
        "data = open(sys.argv[1], 'rb').read(); "
        "print(load_pool_bytes(data, sys.argv[1])[0].num_rows)"
    )
    for _ in range(20):  # the abort is a race: one clean exit proves little
        done = subprocess.run(
            [sys.executable, "-c", program, str(pool)], capture_output=True, text=True
        )
        assert (done.returncode, done.stdout.strip()) == (0, "175"), done.stderr


def test_text_hashes_answer_membership_like_a_set():
    from lion_ray.logic.pools import TextHashes
    from lion_ray.sandbox.tasks import stratified_tasks

    texts = [f"Reverse 'w{i}'." for i in range(5000)]
    hashes = TextHashes([texts[:2000], texts[2000:], []])  # windows of a pool
    assert len(hashes) == 5000 and all(t in hashes for t in texts[::7])
    assert "Reverse 'w5000'." not in hashes and 3 not in hashes
    assert TextHashes([]).__len__() == 0 and "x" not in TextHashes([])
    # the held-out tasks exclude a pool the same way through either container
    pool = [t.instruction for t in stratified_tasks(2, seed=5, max_difficulty=3)]
    as_set = stratified_tasks(3, seed=5, max_difficulty=3, exclude=set(pool))
    as_hashes = stratified_tasks(3, seed=5, max_difficulty=3, exclude=TextHashes([pool]))
    assert [t.instruction for t in as_set] == [t.instruction for t in as_hashes]
    assert not {t.instruction for t in as_set} & set(pool)
