"""The run directory and its manifest of typed stage records.

Layout (``RunDir`` builds every path, so nothing else spells them)::

    <run>/
      manifest.json                    stage records, replaced atomically (version 2)
      config.yaml                      the resolved config (names of key variables, no keys)
      student_init/                    tiny student, when student.model_path is empty
      heldout.jsonl                    sandbox held-out tasks with answers
      cache/<role>/*.jsonl             durable API response cache shards
      spend/<role>/*.jsonl             write-ahead spend ledger (the budget's source of truth)
      batches/<role>/*.json            batches submitted to the provider (mode: batch)
      round_<r>/pools/{train,cache}.parquet
      round_<r>/imitation/teacher.parquet, train/ (Ray Train checkpoints), model/
      round_<r>/discrimination/{teacher,student,judged}.parquet
      round_<r>/generation/{candidates,new}.parquet
      round_<r>/eval/heldout.parquet
      round_<r>/report/{report.json,index.html,*.png}

A ``StageRecord`` says what a completed stage read (each input's URI and content
fingerprint), what it wrote, its row counts, per-role API accounting and metrics. Status,
reports, serving ("the newest round") and the driver read stages through this schema only.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field

from lion_ray import storage
from lion_ray.errors import LionError

MANIFEST_VERSION = 2


class ApiUsage(BaseModel):
    """What one role's calls cost in one stage."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    rows: int = 0
    ok: int = 0
    failed: int = 0
    budget: int = 0
    cached: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class StageInput(BaseModel):
    uri: str = Field(description="Relative to the run directory when inside it, else absolute.")
    fingerprint: str


class StageRecord(BaseModel):
    """A completed stage."""

    key: str
    inputs: dict[str, StageInput] | None = Field(
        None, description="None: recorded by lion-ray 0.1.0, adopted on the next resume."
    )
    outputs: dict[str, str] = Field(default_factory=dict)
    rows: int = 0
    failed: int = 0
    api: dict[str, ApiUsage] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    seconds: float = 0.0
    compute_s: float | None = Field(
        None, description="Wall time an engine computed (training loop, inference, dedup)."
    )
    api_wait_s: float = Field(0.0, description="Wall time some API request was in flight.")
    completed_at: float = Field(default_factory=time.time)

    @property
    def overhead_s(self) -> float:
        """Wall time neither computing nor waiting for the API: start-up, loading, I/O."""
        return max(0.0, self.seconds - (self.compute_s or 0.0) - self.api_wait_s)

    @property
    def round(self) -> int | None:
        head, _, _ = self.key.partition("/")
        return int(head.removeprefix("round_")) if head.startswith("round_") else None

    @property
    def stage(self) -> str:
        return self.key.rpartition("/")[2]

    @property
    def cost_usd(self) -> float:
        return sum(a.cost_usd for a in self.api.values())

    @property
    def tokens(self) -> int:
        return sum(a.tokens for a in self.api.values())


class StageFailure(BaseModel):
    """A stage that raised: its error, kept until the stage completes (a resume retries it)."""

    key: str
    error: str
    attempts: int = 1
    failed_at: float = Field(default_factory=time.time)


class ManifestData(BaseModel):
    version: int = MANIFEST_VERSION
    stages: dict[str, StageRecord] = Field(default_factory=dict)
    failures: dict[str, StageFailure] = Field(default_factory=dict)
    current_stage: str | None = None
    finished_rounds: int | None = None
    # stages a finished run did not run, and why (the last round's discrimination and
    # generation feed a round the run does not have); a run extended later runs them
    skipped: dict[str, str] = Field(default_factory=dict)


# Top-level fields 0.1.0 wrote beside rows/failed/api/metrics/seconds; now they are metrics.
_LEGACY_EXTRAS = ("sizes", "next", "import")


def _from_legacy(data: dict) -> ManifestData:
    """A 0.1.0 manifest (version 1, free-form dicts) as typed records with unknown inputs."""
    stages = {}
    for key, info in data.get("stages", {}).items():
        metrics = dict(info.get("metrics") or {})
        metrics.update({k: info[k] for k in _LEGACY_EXTRAS if k in info})
        stages[key] = StageRecord(
            key=key,
            inputs=None,
            rows=info.get("rows") or 0,
            failed=info.get("failed") or 0,
            api=info.get("api") or {},
            metrics=metrics,
            seconds=info.get("seconds") or 0.0,
            completed_at=info.get("completed_at") or 0.0,
        )
    return ManifestData(
        stages=stages,
        current_stage=data.get("current_stage"),
        finished_rounds=data.get("finished_rounds"),
    )


class Manifest:
    """Which stages of a run are complete, as typed records.

    Every update rewrites ``manifest.json`` atomically, so a stage is either recorded
    complete (its outputs were written before) or not at all.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.data = ManifestData()
        if storage.exists(uri):
            raw = storage.read_json(uri)
            version = raw.get("version", 1)
            if version == 1:
                self.data = _from_legacy(raw)
            elif version == MANIFEST_VERSION:
                self.data = ManifestData.model_validate(raw)
            else:
                raise LionError(
                    f"{uri}: manifest version {version} was written by a newer lion-ray; "
                    "upgrade lion-ray to resume this run"
                )

    @property
    def stages(self) -> dict[str, StageRecord]:
        return self.data.stages

    def get(self, key: str) -> StageRecord | None:
        return self.stages.get(key)

    def _write(self) -> None:
        storage.write_json(self.uri, self.data.model_dump(mode="json"))

    def record(self, rec: StageRecord) -> None:
        self.stages[rec.key] = rec
        self.data.failures.pop(rec.key, None)
        self.data.skipped.pop(rec.key, None)
        self._write()

    def set_skipped(self, skipped: dict[str, str]) -> None:
        """The stages this run leaves out, by key, and why (replacing the last list)."""
        if skipped != self.data.skipped:
            self.data.skipped = dict(skipped)
            self._write()

    def record_failure(self, key: str, error: str) -> StageFailure:
        """Keep why ``key`` failed (status and report show it); the stage stays not done."""
        before = self.data.failures.get(key)
        failure = StageFailure(
            key=key, error=error[:4000], attempts=before.attempts + 1 if before else 1
        )
        self.data.failures[key] = failure
        self._write()
        return failure

    def forget(self, keys: list[str]) -> None:
        for key in keys:
            self.stages.pop(key, None)
        self._write()

    def set_current(self, key: str | None) -> None:
        self.data.current_stage = key
        self._write()

    def set_finished(self, rounds: int) -> None:
        self.data.current_stage = None
        self.data.finished_rounds = rounds
        self._write()


MTIME_RESOLUTION_NS = 2_000_000_000  # an object store's LastModified: whole seconds


class RunDir:
    """Every path of a run directory, built in one place."""

    def __init__(self, uri: str):
        self.uri = os.path.abspath(os.path.expanduser(uri)) if "://" not in uri else uri.rstrip("/")
        self.manifest = Manifest(self.path("manifest.json"))
        self._prints: dict | None = None

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def round_path(self, round_no: int, *parts: str) -> str:
        return self.path(f"round_{round_no}", *parts)

    def pool(self, round_no: int, which: str) -> str:
        return self.round_path(round_no, "pools", f"{which}.parquet")

    def cache_dir(self, role: str) -> str:
        return self.path("cache", role)

    def ledger_dir(self, role: str) -> str:
        return self.path("spend", role)

    def batch_dir(self, role: str) -> str:
        return self.path("batches", role)

    def model_dir(self, round_no: int) -> str:
        return self.round_path(round_no, "imitation", "model")

    def fingerprint(self, uri: str) -> str:
        """``storage.fingerprint``, remembered for files by size and modification time in
        ``fingerprints.json``: a resumed run does not hash every earlier round's files
        again (at a million rows, seconds each, every stage, every resume)."""
        fs, path = storage.resolve(uri)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return storage.fingerprint(uri)
        key = self.relative(uri)
        stamp = [info.size, info.mtime_ns]
        if self._prints is None:
            memo = self.path("fingerprints.json")
            self._prints = storage.read_json(memo) if storage.exists(memo) else {}
        known = self._prints.get(key)
        if known and known[:2] == stamp:
            return known[2]
        hashed_at = time.time_ns()
        value = storage.fingerprint(uri)
        # Remembered only for a file already older than a modification time's resolution
        # (an object store's is one second): a later rewrite of the same size then has
        # another time. A file hashed just after it was written is hashed again next time.
        if info.mtime_ns is not None and hashed_at - info.mtime_ns > MTIME_RESOLUTION_NS:
            self._prints[key] = [*stamp, value]
            storage.write_json(self.path("fingerprints.json"), self._prints)
        return value

    def relative(self, uri: str) -> str:
        """``uri`` relative to the run directory when inside it (so a moved run still
        matches its records), else unchanged."""
        prefix = self.uri.rstrip("/") + "/"
        return uri[len(prefix) :] if uri.startswith(prefix) else uri

    def recorded_spend(self, role: str) -> float:
        """What the completed stages recorded as paid to ``role``."""
        return sum(
            rec.api[role].cost_usd for rec in self.manifest.stages.values() if role in rec.api
        )

    def rounds_done(self) -> list[int]:
        """Rounds whose student export is recorded complete, ascending."""
        return sorted(
            rec.round
            for rec in self.manifest.stages.values()
            if rec.stage == "imitation.train" and rec.round is not None
        )
