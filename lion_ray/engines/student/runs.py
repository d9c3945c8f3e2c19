"""What a serving replica reads from a run directory: the newest round's student, the
student settings the run trained with, and what the run's engine last moved replicas to."""

from __future__ import annotations

import logging

from lion_ray import storage
from lion_ray.config import StudentConfig
from lion_ray.rundir import RunDir

log = logging.getLogger("ray.serve")


def run_student(run_uri: str, default: StudentConfig) -> StudentConfig:
    """The student settings a run trained with (its saved config), else ``default``: the
    served prompt format must be the one the student learned."""
    from lion_ray.config import parse_config

    saved = storage.join(run_uri, "config.yaml")
    if not storage.exists(saved):
        return default
    return parse_config(storage.read_text(saved), saved).student


def newest_model(run_uri: str) -> str | None:
    """The newest round's exported student in a run directory, if any."""
    run = RunDir(run_uri)
    rounds = run.rounds_done()
    return run.model_dir(rounds[-1]) if rounds else None


def engine_record(engine: dict | None) -> dict | None:
    """What a run's engine last moved every replica to ({"model_dir", "asleep"}), from the
    record ``StudentEngine`` keeps; None without one, or when the record is another engine's
    (an earlier driver of the same run). An unreadable record is ignored: the replica starts
    on the engine's first student, as it would without one."""
    if not engine or not engine.get("record"):
        return None
    try:
        if not storage.exists(engine["record"]):
            return None
        record = storage.read_json(engine["record"])
    except (OSError, ValueError) as exc:
        log.warning("ignoring the engine record %s: %s", engine["record"], exc)
        return None
    if not isinstance(record, dict) or record.get("engine") != engine.get("id"):
        return None
    return {k: record[k] for k in ("model_dir", "asleep") if k in record}
