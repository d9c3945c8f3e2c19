"""The run directory: one URI (local path, ``s3://``, ``gs://``, any pyarrow filesystem).

Layout (``RunDir`` builds every path, so nothing else spells them)::

    <run>/
      manifest.json                    completed stages, replaced atomically
      config.yaml                      the resolved config (names of key variables, no keys)
      student_init/                    tiny student, when student.model_path is empty
      heldout.jsonl                    sandbox held-out tasks with answers
      cache/<role>/*.jsonl             durable API response cache shards
      round_<r>/pools/{train,cache}.parquet
      round_<r>/imitation/teacher.parquet, train/ (Ray Train checkpoints), model/
      round_<r>/discrimination/{teacher,student,referee,judged}.parquet
      round_<r>/generation/{candidates,new}.parquet
      round_<r>/eval/heldout.parquet
      round_<r>/report/{report.json,index.html,*.png}

Every file is written to a temporary name and renamed, so a reader never sees half a file
and a crash never corrupts what was already there.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A (filesystem, path) pair for a local path or a pyarrow URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    return pafs.FileSystem.from_uri(uri)


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _tmp_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}.tmp-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_output(uri: str) -> Iterator[pa.NativeFile]:
    """An output stream that becomes ``uri`` only when the block finishes without error."""
    fs, path = resolve(uri)
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    tmp = _tmp_name(path)
    try:
        with fs.open_output_stream(tmp) as out:
            yield out
        fs.move(tmp, path)
    except BaseException:
        with suppress(OSError):
            fs.delete_file(tmp)
        raise


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_output(uri) as out:
        out.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_parquet(uri: str, table: pa.Table) -> None:
    """Write a table atomically (temporary name, then rename)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue())


def read_parquet(uri: str) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """URIs of the files directly under ``uri`` (sorted), skipping temporary files."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.File
        and not i.base_name.startswith(".")
        and i.base_name.endswith(suffix)
    )
    return [join(uri, n) for n in names]


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory to ``uri`` (a no-op copy onto itself is skipped)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem) and os.path.abspath(local_dir) == path:
        return
    fs.create_dir(path, recursive=True)
    pafs.copy_files(
        str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy ``uri`` to a local directory; a local ``uri`` is returned as is."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(
        path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
    )
    return Path(local_dir)


class Manifest:
    """Which stages of a run are complete, with their row counts and metrics.

    The driver is the only writer; every update rewrites ``manifest.json`` atomically, so a
    stage is either recorded complete (its outputs were written before) or not at all.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.data: dict[str, Any] = {"stages": {}, "version": 1}
        if exists(uri):
            self.data = read_json(uri)

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def is_done(self, key: str) -> bool:
        return key in self.stages

    def get(self, key: str) -> dict[str, Any] | None:
        return self.stages.get(key)

    def mark_done(self, key: str, **info: Any) -> None:
        self.stages[key] = {"completed_at": time.time(), **info}
        write_json(self.uri, self.data)

    def set(self, field: str, value: Any) -> None:
        self.data[field] = value
        write_json(self.uri, self.data)


class RunDir:
    """Every path of a run directory, built in one place."""

    def __init__(self, uri: str):
        self.uri = os.path.abspath(os.path.expanduser(uri)) if "://" not in uri else uri.rstrip("/")
        self.manifest = Manifest(self.path("manifest.json"))

    def path(self, *parts: str) -> str:
        return join(self.uri, *parts)

    def round_path(self, round_no: int, *parts: str) -> str:
        return self.path(f"round_{round_no}", *parts)

    def pool(self, round_no: int, which: str) -> str:
        return self.round_path(round_no, "pools", f"{which}.parquet")

    def cache_dir(self, role: str) -> str:
        return self.path("cache", role)

    def model_dir(self, round_no: int) -> str:
        return self.round_path(round_no, "imitation", "model")

    def rounds_done(self) -> list[int]:
        """Rounds whose student export is recorded complete, ascending."""
        done = []
        for key in self.manifest.stages:
            if key.endswith("/imitation.train"):
                done.append(int(key.split("/")[0].removeprefix("round_")))
        return sorted(done)
