"""The spend ledger: a write-ahead journal of what an endpoint may have cost.

One ledger per endpoint role under ``<run>/spend/<role>/``. The limiter writes a
reservation (worst-case cost) *before* a request may be sent and a settlement (real cost)
when it finished, so after any crash the run's spend is known: settled costs plus the
worst case of every request that was in flight. That total is what the budget checks,
across every attempt, every command that spends against the run, and every crash.

On a local disk each instance appends to its own file (a write survives the process being
killed; only a power loss could drop the last milliseconds). On an object store, which
cannot append, each commit is a new small object; opening the ledger folds everything into
one snapshot. ``load`` reads it without writing (``lion-ray status``).
"""

from __future__ import annotations

import contextlib
import json
import uuid

from lion_ray import storage
from lion_ray.logic.accounting import SpendTotals, fold_ledger

SUFFIX = ".jsonl"


def _read(uri: str) -> list[dict]:
    entries = []
    for line in storage.read_text(uri).splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a power loss; the rest of the file stands
    return entries


def _files(ledger_dir: str) -> dict[str, list[dict]]:
    return {uri.rsplit("/", 1)[1]: _read(uri) for uri in storage.list_files(ledger_dir, SUFFIX)}


def load(ledger_dir: str) -> SpendTotals:
    """The ledger's totals, read only."""
    return fold_ledger(_files(ledger_dir))


def legacy_spend(cache_dir: str, recorded_usd: float = 0.0) -> float:
    """What a run from before the ledger (lion-ray 0.1.0) spent on one role: each line of its
    response cache is one paid call with its cost, and ``recorded_usd`` is what its completed
    stages recorded; each misses something (the cache, duplicates its compaction merged; the
    records, interrupted stages), so the larger stands."""
    paid = 0.0
    for shard in storage.list_files(cache_dir, SUFFIX):
        paid += sum(e.get("cost_usd", 0.0) for e in _read(shard))
    return max(paid, recorded_usd)


class SpendLedger:
    """One writer of a ledger (the limiter of one endpoint)."""

    def __init__(self, ledger_dir: str):
        self.dir = ledger_dir
        self.instance = uuid.uuid4().hex[:12]
        self.local = storage.is_local(ledger_dir)
        self.pending: list[str] = []
        self.seq = 0
        self._file = None

    def open(self, legacy_usd: float = 0.0) -> SpendTotals:
        """Replay the ledger and fold it into one snapshot; returns the totals so far.
        ``legacy_usd``: what the run spent before it had a ledger (used when it has none)."""
        files = _files(self.dir)
        totals = fold_ledger(files)
        if not files and legacy_usd:
            totals = SpendTotals(
                settled_usd=legacy_usd, by_stage={"(before the ledger)": legacy_usd}
            )
        if files or totals.spent_usd:
            snapshot = {
                "snapshot": True,
                "replaces": sorted(files),
                "settled_usd": totals.settled_usd,
                "by_stage": totals.by_stage,
                "open": totals.open,  # still at their worst case until settled
            }
            storage.write_text(
                storage.join(self.dir, f"snapshot-{self.instance}{SUFFIX}"),
                json.dumps(snapshot) + "\n",
            )
            fs, _ = storage.resolve(self.dir)
            for name in files:  # already folded; a crash before this line only leaves extras
                with contextlib.suppress(OSError):
                    fs.delete_file(storage.resolve(storage.join(self.dir, name))[1])
        return totals

    def append(self, entry: dict) -> None:
        self.pending.append(json.dumps(entry, separators=(",", ":")))

    def take(self) -> list[str]:
        lines, self.pending = self.pending, []
        return lines

    def write(self, lines: list[str]) -> None:
        """Make ``lines`` durable (raises OSError when the ledger cannot be written)."""
        if not lines:
            return
        text = "".join(line + "\n" for line in lines)
        if self.local:
            if self._file is None:
                path = storage.resolve(storage.join(self.dir, f"{self.instance}{SUFFIX}"))[1]
                fs, _ = storage.resolve(self.dir)
                fs.create_dir(storage.resolve(self.dir)[1], recursive=True)
                self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open
            self._file.write(text)
            self._file.flush()
        else:
            self.seq += 1
            storage.write_text(
                storage.join(self.dir, f"{self.instance}-{self.seq:08d}{SUFFIX}"), text
            )

    def commit(self) -> None:
        self.write(self.take())
