"""One progress display for every long stage: rows, rate, ETA, cost and failures.

On a terminal it is a rich progress bar; elsewhere (CI logs, `ray job logs`) it prints a
plain status line every ``log_every_s`` seconds and once at the end.
"""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LOG_WIDTH = 160


def make_console(stderr: bool = False) -> Console:
    """A rich console; off a terminal (``ray job logs``, CI, a pipe) it is 160 columns wide
    instead of rich's 80, so the round tables are not cropped in logs read later."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = LOG_WIDTH
    return console


class StageProgress:
    def __init__(
        self,
        label: str,
        total: int,
        *,
        unit: str = "rows",
        enabled: bool = True,
        console: Console | None = None,
        log_every_s: float = 10.0,
    ):
        self.label, self.total, self.unit = label, total, unit
        self.enabled = enabled
        self.console = console or make_console(stderr=True)
        self.log_every_s = log_every_s
        self.done = 0
        self.cost = 0.0
        self.failed = 0
        self.cached = 0
        self.rate: float | None = None
        self.rate_unit = "/min"
        self._progress: Progress | None = None
        self._task = None
        self._last_log = 0.0
        self._started = time.monotonic()

    def __enter__(self) -> StageProgress:
        if self.enabled and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TextColumn("{task.fields[extra]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total, extra="")
        return self

    def _extra(self) -> str:
        parts = []
        if self.rate is not None:
            parts.append(f"{self.rate:,.0f}{self.rate_unit}")
        if self.cached:
            parts.append(f"cached {self.cached}")
        if self.failed:
            parts.append(f"[red]failed {self.failed}[/red]")
        if self.cost:
            parts.append(f"${self.cost:.4f}")
        return " ".join(parts)

    def advance(
        self, n: int = 1, *, cost: float = 0.0, failed: bool = False, cached: int = 0
    ) -> None:
        self.done += n
        self.cost += cost
        self.failed += int(failed)
        self.cached += cached
        self._refresh()

    def set_rate(self, value: float, unit: str = "/min") -> None:
        self.rate, self.rate_unit = value, unit

    def set_total(self, total: int) -> None:
        self.total = total
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    def _refresh(self, final: bool = False) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done, extra=self._extra())
            return
        now = time.monotonic()
        if final or now - self._last_log >= self.log_every_s:
            self._last_log = now
            elapsed = now - self._started
            eta_text = (
                f"eta {(self.total - self.done) * elapsed / self.done:.0f}s" if self.done else ""
            )
            self.console.print(
                f"{self.label}: {self.done}/{self.total} {self.unit} {self._extra()} "
                f"elapsed {elapsed:.0f}s {eta_text}",
                markup=True,
                highlight=False,
                soft_wrap=True,
            )

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._refresh()
            self._progress.stop()
        elif self.done:
            self._refresh(final=True)
