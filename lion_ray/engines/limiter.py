"""One rate limit per endpoint for the whole cluster.

``RateLimit`` (plain Python) schedules every request against requests-per-minute and
tokens-per-minute with the generic cell rate algorithm: each request reserves a send time,
so callers sleep locally instead of holding a lock. It also keeps the spending budget.
``LimiterActor`` is a thin Ray actor around it; every API actor on every node asks the
same one, which is what makes the limit global (``ray.data.llm``'s HTTP processor limits
``qps`` per actor instead).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from lion_ray.config import MAX_IN_FLIGHT

# Pace a little under the provider's limit: requests leave on time but arrive with jitter.
DEFAULT_HEADROOM = 0.97


def parse_duration(text: str | None) -> float | None:
    """Seconds in an ``x-ratelimit-reset-*`` value: '20ms', '1.5s', '6m0s', '1h2m3s', '2'."""
    if not text:
        return None
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    total, number = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in units or not number:
            return None
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    return total if not number else None


@dataclass
class LimitStats:
    reserved: int = 0
    refused_budget: int = 0
    pauses: int = 0
    adapted_rpm: float | None = None
    adapted_tpm: float | None = None


class RateLimit:
    """Send-time reservations under rpm and tpm, pauses on Retry-After, and a budget."""

    def __init__(
        self,
        rpm: float,
        tpm: float,
        *,
        burst_s: float = 0.25,
        headroom: float = DEFAULT_HEADROOM,
        budget_usd: float | None = None,
        spent_usd: float = 0.0,
        clock=time.monotonic,
    ):
        self.clock = clock
        self.headroom = headroom
        self.burst_s = burst_s
        self.configured = (float(rpm), float(tpm))
        self.rpm, self.tpm = rpm * headroom, tpm * headroom
        now = clock()
        self.tat_requests = now  # theoretical arrival times (GCRA)
        self.tat_tokens = now
        self.paused_until = now
        self.budget_usd = budget_usd
        self.spent_usd = spent_usd
        self.reserved_usd = 0.0
        self.stats = LimitStats()

    def reserve(self, tokens: int, cost_usd: float = 0.0) -> float:
        """Seconds the caller must wait before sending; -1 when the budget would be exceeded."""
        if (
            self.budget_usd is not None
            and self.spent_usd + self.reserved_usd + cost_usd > self.budget_usd
        ):
            self.stats.refused_budget += 1
            return -1.0
        now = self.clock()
        request_interval = 60.0 / self.rpm
        token_interval = 60.0 * tokens / self.tpm
        send = max(
            now,
            self.paused_until,
            self.tat_requests - self.burst_s,
            self.tat_tokens - self.burst_s,
        )
        self.tat_requests = max(self.tat_requests, send) + request_interval
        self.tat_tokens = max(self.tat_tokens, send) + token_interval
        self.reserved_usd += cost_usd
        self.stats.reserved += 1
        return send - now

    def settle(self, reserved_cost: float, actual_cost: float) -> None:
        """A request finished (or gave up): replace its estimated cost with the real one."""
        self.reserved_usd = max(0.0, self.reserved_usd - reserved_cost)
        self.spent_usd += actual_cost

    def pause(self, seconds: float) -> None:
        """The provider said Retry-After: nobody sends before then, and the schedule restarts."""
        until = self.clock() + seconds
        if until > self.paused_until:
            self.paused_until = until
            self.stats.pauses += 1
        self.tat_requests = max(self.tat_requests, until)
        self.tat_tokens = max(self.tat_tokens, until)

    def observe(self, headers: dict[str, str]) -> None:
        """Adapt to ``x-ratelimit-*`` headers: a lower limit than configured, or none left."""
        for kind, configured in (("requests", self.configured[0]), ("tokens", self.configured[1])):
            limit = headers.get(f"x-ratelimit-limit-{kind}")
            if limit and limit.isdigit() and 0 < int(limit) < configured:
                if kind == "requests":
                    self.rpm = int(limit) * self.headroom
                    self.stats.adapted_rpm = self.rpm
                else:
                    self.tpm = int(limit) * self.headroom
                    self.stats.adapted_tpm = self.tpm
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            if remaining == "0":
                reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
                if reset:
                    self.pause(reset)

    def snapshot(self) -> dict:
        return {
            "rpm": self.rpm,
            "tpm": self.tpm,
            "spent_usd": self.spent_usd,
            "reserved_usd": self.reserved_usd,
            "reserved": self.stats.reserved,
            "refused_budget": self.stats.refused_budget,
            "pauses": self.stats.pauses,
            "adapted_rpm": self.stats.adapted_rpm,
            "adapted_tpm": self.stats.adapted_tpm,
        }


class Limiter:
    """The cluster-wide home of one endpoint's ``RateLimit`` and spend ledger, as a plain
    class: ``LimiterActor`` is the Ray actor around it.

    One per endpoint for a whole run, named after its ledger, so every stage, every wave of
    a stage and every command that spends against the run (``lion-ray answer`` beside a
    running driver) shares its schedule, its pauses and its budget. Async: calls never queue
    behind a sleeping caller, because callers sleep on their own side.
    """

    def __init__(
        self,
        *,
        rpm: float,
        tpm: float,
        budget_usd: float | None = None,
        ledger_dir: str | None = None,
        legacy_usd: float = 0.0,
    ):
        import asyncio

        from lion_ray.engines.ledger import SpendLedger

        self.ledger = SpendLedger(ledger_dir) if ledger_dir else None
        totals = self.ledger.open(legacy_usd) if self.ledger else None
        spent = totals.spent_usd if totals else 0.0
        self.limit = RateLimit(rpm, tpm, budget_usd=budget_usd, spent_usd=spent)
        self.spent_at_start = spent
        # reservations of earlier attempts still open (counted in `spent` at their worst
        # case): a batch that was at the provider when its driver died settles them later
        self.inherited = {t: usd for t, (usd, _) in totals.open.items()} if totals else {}
        self.tickets = 0
        self.lock = asyncio.Lock()
        self.appended = self.committed = 0
        # a caller that gives up before sending (its stage stopped) names its request:
        # one still waiting here is dropped when it wakes, one already given a ticket is
        # settled at nothing (it was never sent), so no reservation outlives its stage
        self.waiting: set[str] = set()
        self.given_up: set[str] = set()
        self.issued: dict[str, str] = {}  # request -> its ticket, until settled
        self.issued_to: dict[str, str] = {}  # ticket -> request

    async def configure(self, rpm: float, tpm: float, budget_usd: float | None) -> None:
        """New limits or a new cap (a resumed run may change them); pauses and spend stay."""
        lim = self.limit
        lim.configured = (float(rpm), float(tpm))
        lim.rpm, lim.tpm = rpm * lim.headroom, tpm * lim.headroom
        lim.budget_usd = budget_usd

    async def _durable(self) -> None:
        """Group commit: one write covers every entry appended before it started."""
        if self.ledger is None:
            return
        target = self.appended
        async with self.lock:
            if self.committed >= target:
                return
            lines, upto = self.ledger.take(), self.appended
            if self.ledger.local:
                self.ledger.write(lines)
            else:
                import asyncio

                await asyncio.to_thread(self.ledger.write, lines)
            self.committed = upto

    def _append(self, entry: dict) -> None:
        self.ledger.append(entry)
        self.appended += 1

    async def reserve(
        self, tokens: int, cost_usd: float = 0.0, stage: str = "", request: str | None = None
    ) -> tuple[float, str | None]:
        """Returns when the caller may send: (0, ticket), or (-1, None) when the budget would
        be exceeded. The wait happens here, not at the caller, so the ledger's reservation is
        written just before the request leaves: after a crash, the open reservations are the
        requests that were really in flight, not every one that was queued. ``request``: the
        caller's name for it, which ``give_up`` takes."""
        import asyncio

        delay = self.limit.reserve(tokens, cost_usd)
        if delay < 0:
            return delay, None
        if request is not None:
            self.waiting.add(request)
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            while (held := self.limit.paused_until - self.limit.clock()) > 0:
                await asyncio.sleep(held)  # a Retry-After that came while we waited holds us
        finally:
            self.waiting.discard(request)
        if request is not None and request in self.given_up:
            self.given_up.discard(request)
            self.limit.settle(cost_usd, 0.0)  # its caller stopped: nothing will be sent
            return -2.0, None
        ticket = self._new_ticket(cost_usd, stage)
        if request is not None:
            self.issued[request], self.issued_to[ticket] = ticket, request
        await self._durable()
        return 0.0, ticket

    async def give_up(self, request: str, reserved_cost: float, stage: str = "") -> None:
        """The caller of ``request`` stopped before sending it (its stage stopped): release
        the reservation, whether it still waits here or already has a ticket."""
        ticket = self.issued.get(request)
        if ticket is not None:
            self._settle(ticket, reserved_cost, 0.0, stage)
            await self._durable()
        elif request in self.waiting:
            self.given_up.add(request)

    def _new_ticket(self, cost_usd: float, stage: str) -> str:
        self.tickets += 1
        ticket = f"{self.ledger.instance if self.ledger else 'x'}-{self.tickets}"
        if self.ledger is not None:
            self._append({"t": ticket, "w": cost_usd, "s": stage})
        return ticket

    async def reserve_many(self, costs: list[float], stage: str = "") -> list[str | None]:
        """Budget reservations for a batch (no pacing: a batch is not sent at a rate); None
        where the budget would be exceeded. In the ledger before this returns."""
        tickets = []
        for cost in costs:
            lim = self.limit
            if (
                lim.budget_usd is not None
                and lim.spent_usd + lim.reserved_usd + cost > lim.budget_usd
            ):
                lim.stats.refused_budget += 1
                tickets.append(None)
                continue
            lim.reserved_usd += cost
            tickets.append(self._new_ticket(cost, stage))
        await self._durable()
        return tickets

    def _settle(self, ticket: str | None, reserved_cost: float, actual_cost: float, stage: str):
        # a ticket settled by its caller is no longer the caller's to give up
        self.issued.pop(self.issued_to.pop(ticket, None), None)
        if ticket in self.inherited:  # counted in `spent` at its worst case since the replay
            self.limit.spent_usd += actual_cost - self.inherited.pop(ticket)
        else:
            self.limit.settle(reserved_cost, actual_cost)
        if self.ledger is not None and ticket:
            self._append({"t": ticket, "a": actual_cost, "s": stage})

    async def settle_many(self, items: list[tuple[str, float, float]], stage: str = "") -> None:
        """(ticket, reserved, actual) for each request of a batch read back."""
        for ticket, reserved_cost, actual_cost in items:
            self._settle(ticket, reserved_cost, actual_cost, stage)
        await self._durable()

    async def report(
        self,
        ticket: str | None,
        reserved_cost: float,
        actual_cost: float,
        headers: dict[str, str] | None = None,
        retry_after: float | None = None,
        stage: str = "",
    ) -> None:
        self._settle(ticket, reserved_cost, actual_cost, stage)
        if headers:
            self.limit.observe(headers)
        if retry_after:
            self.limit.pause(retry_after)
        await self._durable()

    async def pause(self, seconds: float) -> None:
        self.limit.pause(seconds)

    async def snapshot(self) -> dict:
        return self.limit.snapshot() | {
            "paused_until_s": max(0.0, self.limit.paused_until - self.limit.clock()),
            "spent_at_start_usd": self.spent_at_start,
            "budget_usd": self.limit.budget_usd,
            "instance": self.ledger.instance if self.ledger else None,
        }


LimiterActor = ray.remote(
    num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=MAX_IN_FLIGHT
)(Limiter)
