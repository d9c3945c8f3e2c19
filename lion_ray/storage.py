"""Storage for a run: one URI (local path, ``s3://``, ``gs://``, any pyarrow filesystem).

The run directory's layout and manifest live in ``lion_ray.rundir``; this module is the
I/O underneath: atomic writes, directory copies and content fingerprints.

Every file is written to a temporary name and renamed, so a reader never sees half a file
and a crash never corrupts what was already there.
"""

from __future__ import annotations

import hashlib
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


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    fs.delete_file(path)


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


# --- model directories on object stores ------------------------------------------------------

# An object store has no rename, so a model directory there is published as a new version
# beside the old one (``<dir>/v-.../``), then switched to by rewriting one small pointer
# object (a single PUT: readers see the old copy or the new one, never a mix); older
# versions are deleted after the switch. Readers resolve the pointer with ``current``.
CURRENT = "lion_ray_current.json"


def current(uri: str) -> str:
    """Where a model directory's files are: the pointed-to version on an object store (if
    published that way), else the directory itself."""
    if is_local(uri):
        return uri
    pointer = join(uri, CURRENT)
    if exists(pointer):
        return join(uri, read_json(pointer)["version"])
    return uri


def publish_dir(local_dir: str | Path, uri: str) -> None:
    """Make the finished directory ``local_dir`` the content of ``uri``; a reader never sees
    half of it, and the old content stays readable until the new one is complete."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        staging = f"{path.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
        upload_dir(local_dir, staging)
        retired = f"{path.rstrip('/')}.old-{uuid.uuid4().hex[:8]}"
        if os.path.exists(path):
            os.replace(path, retired)  # two renames: the gap has no half-written model
        os.replace(staging, path)
        delete_dir(retired)
        return
    version = f"v-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    upload_dir(local_dir, join(uri, version))
    before = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    write_json(join(uri, CURRENT), {"version": version})  # the switch
    for info in before:  # older versions, or files of a copy published before versions
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if name in (CURRENT, version):
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)


# --- content fingerprints -------------------------------------------------------------------

# Written last into every model directory lion-ray exports: per-file sizes and sha256. Its
# presence says the copy is complete; its hash is the directory's fingerprint, so a 14 GB
# model is fingerprinted by reading one small file.
CHECKSUMS = "lion_ray_checksums.json"
_SMALL_FILE = 1 << 20  # files hashed whole in a directory without checksums


def sha256_of(uri: str) -> str:
    fs, path = resolve(uri)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _tree(uri: str) -> list[tuple[str, int]]:
    """(relative path, size) of every file under a directory, temporaries skipped."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    out = []
    for i in infos:
        rel = i.path[len(path.rstrip("/")) + 1 :]
        if i.type == pafs.FileType.File and not any(p.startswith(".") for p in rel.split("/")):
            out.append((rel, i.size))
    return sorted(out)


def write_checksums(local_dir: str | Path) -> dict:
    """Record every file's size and sha256 in ``CHECKSUMS`` (call when the directory is complete)."""
    files = {
        rel: {"size": size, "sha256": sha256_of(os.path.join(str(local_dir), rel))}
        for rel, size in _tree(str(local_dir))
        if rel != CHECKSUMS
    }
    data = {"files": files}
    write_json(os.path.join(str(local_dir), CHECKSUMS), data)
    return data


def verify_checksums(uri: str, deep: bool = False) -> str | None:
    """None when the directory matches its ``CHECKSUMS`` (sizes; contents too if ``deep``),
    else what is wrong."""
    marker = join(uri, CHECKSUMS)
    if not exists(marker):
        return f"no {CHECKSUMS} (an incomplete or foreign copy)"
    expected = read_json(marker)["files"]
    present = dict(_tree(uri))
    for rel, want in expected.items():
        if present.get(rel) != want["size"]:
            return f"{rel}: {'missing' if rel not in present else 'size differs'}"
        if deep and sha256_of(join(uri, rel)) != want["sha256"]:
            return f"{rel}: content differs"
    return None


def fingerprint(uri: str) -> str:
    """A content fingerprint of a file or directory ('missing' when there is none).

    Files: sha256 of the bytes. Directories with ``CHECKSUMS``: the checksum file's hash
    (after checking sizes). Other directories (a user's base model): listing with sizes plus
    the contents of small files (configs, tokenizers).
    """
    uri = current(uri)
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return "missing"
    if info.type == pafs.FileType.File:
        return "sha256:" + sha256_of(uri)
    if exists(join(uri, CHECKSUMS)) and verify_checksums(uri) is None:
        return "checksums:" + sha256_of(join(uri, CHECKSUMS))
    digest = hashlib.sha256()
    for rel, size in _tree(uri):
        small = sha256_of(join(uri, rel)) if size <= _SMALL_FILE else ""
        digest.update(f"{rel}\x1f{size}\x1f{small}\n".encode())
    return "tree:" + digest.hexdigest()


def iter_windows(uri: str, rows: int, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A Parquet file (or folder of parts) as consecutive tables of ``rows`` rows (the last
    may be shorter), read a row group at a time: the whole never in memory."""
    fs, path = resolve(uri)
    import pyarrow.dataset as ds

    dataset = ds.dataset(path, filesystem=fs, format="parquet")
    pending: list[pa.RecordBatch] = []
    count = 0
    # no read-ahead beyond the next batch: the default (16 batches, 4 files) holds up to a
    # million rows of a large pool in memory ahead of the window being read
    batches = dataset.to_batches(
        columns=columns, batch_size=min(rows, 65_536), batch_readahead=1, fragment_readahead=1
    )
    for batch in batches:
        while batch.num_rows:
            take = min(rows - count, batch.num_rows)
            pending.append(batch.slice(0, take))
            batch = batch.slice(take)
            count += take
            if count == rows:
                yield pa.Table.from_batches(pending)
                pending, count = [], 0
    if count:
        yield pa.Table.from_batches(pending)


def read_schema(uri: str) -> pa.Schema:
    fs, path = resolve(uri)
    import pyarrow.dataset as ds

    return ds.dataset(path, filesystem=fs, format="parquet").schema


@contextmanager
def parquet_writer(uri: str, schema: pa.Schema) -> Iterator:
    """``write(table)`` a piece at a time into one Parquet file, which appears at ``uri``
    (atomically) when the block ends without error: its rows are never all in memory."""
    with atomic_output(uri) as out:
        writer = pq.ParquetWriter(out, schema, compression="zstd")
        try:
            yield lambda table: writer.write_table(table.cast(schema))
        finally:
            writer.close()


def count_rows(uri: str) -> int:
    """Rows of a Parquet file (or folder of parts), from its footers alone."""
    fs, path = resolve(uri)
    import pyarrow.dataset as ds

    return ds.dataset(path, filesystem=fs, format="parquet").count_rows()


class WindowedOutput:
    """A stage's output table written a window at a time: each finished window is a part
    beside the output (``<output>.parts/``), so a stage killed mid-way keeps what it did and
    its rerun starts at the first missing window; ``finish`` joins the parts into the one
    output file (atomically, a part at a time) and removes them. ``plan`` names what the
    windows are windows of (the stage's inputs and window size): parts of another plan are
    discarded."""

    def __init__(self, uri: str, plan: dict, schema: pa.Schema | None = None):
        self.uri, self.schema = uri, schema
        self.parts = f"{uri}.parts"
        marker = join(self.parts, "_plan.json")
        if exists(self.parts) and (not exists(marker) or read_json(marker) != plan):
            delete_dir(self.parts)
        if not exists(marker):
            write_json(marker, plan)

    def _part(self, i: int) -> str:
        return join(self.parts, f"part-{i:06d}.parquet")

    def _info(self, i: int) -> str:
        return join(self.parts, f"part-{i:06d}.json")

    def done(self, i: int) -> bool:
        return exists(self._part(i))

    def write(self, i: int, table: pa.Table, info: dict | None = None) -> None:
        """Window ``i``'s rows, and what the stage learned doing it (API usage, timings):
        the info first, so that a part on disk always has its info."""
        write_json(self._info(i), info or {})
        write_parquet(self._part(i), table)

    def infos(self, windows: int) -> list[dict]:
        """Every window's info (those of an earlier, killed attempt included)."""
        return [read_json(self._info(i)) for i in range(windows)]

    def tables(self, windows: int) -> Iterator[pa.Table]:
        """Parts 0..windows-1, one at a time."""
        fs = resolve(self.uri)[0]
        for i in range(windows):
            part = pq.read_table(resolve(self._part(i))[1], filesystem=fs)
            yield part.cast(self.schema) if self.schema is not None else part

    def discard(self) -> None:
        """Drop every part: the next attempt redoes each window."""
        delete_dir(self.parts)

    def finish(self, windows: int) -> tuple[int, list[dict]]:
        """Join parts 0..windows-1 into the output; returns its rows and every window's info
        (those of an earlier, killed attempt included)."""
        rows, infos = 0, self.infos(windows)
        with atomic_output(self.uri) as out:
            writer = None
            for part in self.tables(windows):
                if writer is None:
                    writer = pq.ParquetWriter(out, part.schema, compression="zstd")
                writer.write_table(part)
                rows += part.num_rows
            if writer is None:  # no window at all: an empty table of the schema
                writer = pq.ParquetWriter(out, self.schema or pa.schema([]), compression="zstd")
            writer.close()
        self.discard()
        return rows, infos
