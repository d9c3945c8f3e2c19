import pyarrow as pa
import pytest

from lion_ray import storage
from lion_ray.storage import Manifest, RunDir


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
    assert not run.manifest.is_done("round_1/imitation.teacher")
    run.manifest.mark_done("round_1/imitation.teacher", rows=10)
    run.manifest.mark_done("round_1/imitation.train", rows=10)
    again = RunDir(str(tmp_path / "run"))
    assert again.manifest.get("round_1/imitation.teacher")["rows"] == 10
    assert again.rounds_done() == [1]
    assert isinstance(again.manifest, Manifest)


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
