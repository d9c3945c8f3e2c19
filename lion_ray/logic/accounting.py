"""Token estimates and cost: the same arithmetic on the client (rate limiter, budget) and in
the sandbox server (its own limits and ``usage``), so the two agree."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text with BPE tokenizers
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators per chat message


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN)) if text else 0


def estimate_prompt_tokens(messages: list[dict]) -> int:
    return sum(MESSAGE_OVERHEAD_TOKENS + estimate_tokens(m.get("content") or "") for m in messages)


def cost_usd(
    prompt_tokens: int, completion_tokens: int, price_in_1k: float, price_out_1k: float
) -> float:
    return prompt_tokens / 1000 * price_in_1k + completion_tokens / 1000 * price_out_1k


# --- the spend ledger ---------------------------------------------------------------------
#
# A write-ahead journal per endpoint (``lion_ray.engines.ledger``): before a request is sent
# its worst-case cost is recorded as a reservation, ``{"t": ticket, "w": usd, "s": stage}``;
# when it finishes, the real cost, ``{"t": ticket, "a": usd, "s": stage}``. A snapshot line,
# ``{"snapshot": true, "replaces": [files], "settled_usd": usd, "by_stage": {...},
# "open": {ticket: [usd, stage]}}``, stands for the files it names. A reservation not (yet)
# settled counts at its worst case: a request in flight when its process died may have been
# billed, and a batch still at the provider will be.


@dataclass
class SpendTotals:
    settled_usd: float = 0.0
    by_stage: dict[str, float] = field(default_factory=dict)
    open: dict[str, tuple[float, str]] = field(default_factory=dict)  # ticket -> (worst, stage)

    @property
    def open_usd(self) -> float:
        return sum(usd for usd, _ in self.open.values())

    @property
    def open_tickets(self) -> int:
        return len(self.open)

    @property
    def spent_usd(self) -> float:
        return self.settled_usd + self.open_usd

    def spent_by_stage(self) -> dict[str, float]:
        out = dict(self.by_stage)
        for usd, stage in self.open.values():
            out[stage] = out.get(stage, 0.0) + usd
        return out


def fold_ledger(files: dict[str, list[dict]]) -> SpendTotals:
    """Totals of a ledger given each file's entries (files a snapshot replaces are skipped).

    Reservations first, settlements second, so the order of files does not matter; a ticket
    settled twice (a batch read back twice around a crash) counts once."""
    replaced = {
        name for entries in files.values() for e in entries for name in e.get("replaces", [])
    }
    live = [files[name] for name in sorted(files) if name not in replaced]
    totals = SpendTotals()

    def add(stage: str, usd: float) -> None:
        totals.by_stage[stage] = totals.by_stage.get(stage, 0.0) + usd

    for entries in live:
        for e in entries:
            if e.get("snapshot"):
                totals.settled_usd += e.get("settled_usd", 0.0)
                for stage, usd in e.get("by_stage", {}).items():
                    add(stage, usd)
                totals.open.update({t: (float(w), s) for t, (w, s) in e.get("open", {}).items()})
            elif "w" in e:
                totals.open[e["t"]] = (float(e["w"]), e.get("s", ""))
    settled: set[str] = set()
    for entries in live:
        for e in entries:
            if "a" in e and e["t"] not in settled:
                settled.add(e["t"])
                totals.open.pop(e["t"], None)
                totals.settled_usd += float(e["a"])
                add(e.get("s", ""), float(e["a"]))
    return totals
