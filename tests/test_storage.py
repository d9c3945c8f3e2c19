import json

import pyarrow as pa
import pytest

from lion_ray import storage
from lion_ray.errors import LionError
from lion_ray.rundir import Manifest, RunDir, StageRecord


def test_parquet_roundtrip_and_atomic_replace(tmp_path):
    uri = str(tmp_path / "a" / "t.parquet")
    storage.write_parquet(uri, pa.table({"x": [1, 2]}))
    assert storage.read_parquet(uri).column("x").to_pylist() == [1, 2]
    # a failing writer leaves the old file intact and no temporary file behind
    with pytest.raises(RuntimeError), storage.atomic_output(uri) as out:
        out.write(b"half a file")
        raise RuntimeError("crash mid-write")
    assert storage.read_parquet(uri).column("x").to_pylist() == [1, 2]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["t.parquet"]


def test_manifest_records_and_reloads(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    assert run.manifest.get("round_1/imitation.teacher") is None
    run.manifest.record(StageRecord(key="round_1/imitation.teacher", rows=10))
    run.manifest.record(
        StageRecord(key="round_1/imitation.train", rows=10, api={"teacher": {"cost_usd": 0.5}})
    )
    again = RunDir(str(tmp_path / "run"))
    assert again.manifest.get("round_1/imitation.teacher").rows == 10
    assert again.manifest.get("round_1/imitation.train").cost_usd == 0.5
    assert again.rounds_done() == [1]
    assert isinstance(again.manifest, Manifest)
    again.manifest.forget(["round_1/imitation.train"])
    assert RunDir(str(tmp_path / "run")).rounds_done() == []


def test_a_version_1_manifest_reads_as_typed_records(tmp_path):
    """lion-ray 0.1.0 wrote free-form dicts; they load with unknown inputs (adopted on resume)."""
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "version": 1,
                "current_stage": None,
                "finished_rounds": 1,
                "stages": {
                    "round_1/pools": {
                        "completed_at": 5.0,
                        "rows": 90,
                        "seconds": 0.1,
                        "sizes": {"train": 60, "cache": 60},
                        "next": {"train": 30, "cache": 90},
                    },
                    "round_1/imitation.teacher": {
                        "completed_at": 1.0,
                        "rows": 60,
                        "failed": 0,
                        "api": {"teacher": {"rows": 60, "cost_usd": 0.01, "model": "m"}},
                    },
                },
            }
        )
    )
    m = Manifest(str(tmp_path / "manifest.json"))
    pools = m.get("round_1/pools")
    assert pools.inputs is None and pools.metrics["next"] == {"train": 30, "cache": 90}
    assert m.get("round_1/imitation.teacher").api["teacher"].cost_usd == 0.01
    assert m.data.finished_rounds == 1
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 9, "stages": {}}))
    with pytest.raises(LionError, match="version 9 was written by a newer lion-ray"):
        Manifest(str(tmp_path / "manifest.json"))


def test_fingerprints_follow_content(tmp_path):
    f = tmp_path / "a.parquet"
    storage.write_parquet(str(f), pa.table({"x": [1, 2]}))
    first = storage.fingerprint(str(f))
    storage.write_parquet(str(f), pa.table({"x": [1, 3]}))
    assert storage.fingerprint(str(f)) != first
    assert storage.fingerprint(str(tmp_path / "nothing")) == "missing"
    # a model directory with checksums: fingerprinted by its checksum file, verified by size
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"w" * 100)
    storage.write_checksums(model)
    fp = storage.fingerprint(str(model))
    assert fp.startswith("checksums:") and storage.verify_checksums(str(model)) is None
    moved = tmp_path / "moved"
    model.rename(moved)  # the same content elsewhere: the same fingerprint
    assert storage.fingerprint(str(moved)) == fp
    (moved / "model.safetensors").write_bytes(b"w" * 50)  # a truncated copy is not trusted
    assert "size differs" in storage.verify_checksums(str(moved))
    assert storage.fingerprint(str(moved)).startswith("tree:")
    (moved / "model.safetensors").write_bytes(b"x" * 100)
    assert "content differs" in storage.verify_checksums(str(moved), deep=True)


def test_run_dir_layout(tmp_path):
    run = RunDir(str(tmp_path / "r"))
    assert run.pool(2, "cache").endswith("/r/round_2/pools/cache.parquet")
    assert run.model_dir(1).endswith("/r/round_1/imitation/model")
    assert run.cache_dir("teacher").endswith("/r/cache/teacher")


def test_list_files_skips_temporaries(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}")
    (tmp_path / ".b.jsonl.tmp-1234").write_text("{}")
    (tmp_path / "c.txt").write_text("")
    assert [p.rsplit("/", 1)[1] for p in storage.list_files(str(tmp_path), ".jsonl")] == ["a.jsonl"]
    assert storage.list_files(str(tmp_path / "missing")) == []


def test_upload_and_download_dir_on_mock_filesystem(tmp_path):
    # pyarrow's in-process mock:// filesystem stands in for s3:// (same API)
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"abc")
    fs, _ = storage.resolve("mock:///")
    assert fs is not None
    storage.upload_dir(src, str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "w.bin").read_bytes() == b"abc"


def test_a_run_dir_remembers_fingerprints_of_files_older_than_a_timestamps_resolution(
    tmp_path, monkeypatch
):
    import os
    import time

    from lion_ray.rundir import RunDir

    hashed = []
    real = storage.fingerprint
    monkeypatch.setattr(storage, "fingerprint", lambda uri: hashed.append(uri) or real(uri))
    run = RunDir(str(tmp_path))
    old, new = tmp_path / "old.parquet", tmp_path / "new.parquet"
    old.write_text("aaaa")
    os.utime(old, (time.time() - 60, time.time() - 60))  # written a minute ago
    new.write_text("bbbb")  # just written: its time could still be shared by a rewrite
    first = [run.fingerprint(str(old)), run.fingerprint(str(new))]
    again = RunDir(str(tmp_path))  # a resumed run
    assert [again.fingerprint(str(old)), again.fingerprint(str(new))] == first
    assert hashed == [str(old), str(new), str(new)]  # the old file was hashed once
    old.write_text("cccc")  # same size, new time
    assert RunDir(str(tmp_path)).fingerprint(str(old)) != first[0]
