"""The small interface between the algorithms and whatever answers chat requests.

Discrimination (referee rounds, re-asks), generation (waves, filters, dedup) and the
teacher stage only need ``client.ask(requests) -> results``. The real client is
``lion_ray.engines.api.ApiEngine`` (Ray Data actors, one global limiter, durable cache,
budget); tests pass an in-process fake and run the algorithms in milliseconds.

Every request gets exactly one result back, in the same order: ``ok``, ``failed`` (with
the last error) or ``budget`` (not sent: the spending cap was reached).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ChatRequest:
    request_id: str
    messages: list[dict] = field(hash=False)
    seed: int | None = None
    response_format: dict | None = field(default=None, hash=False)  # e.g. a JSON schema


@dataclass
class ChatResult:
    request_id: str = ""
    text: str = ""
    finish_reason: str = ""
    status: str = "ok"  # ok | failed | budget
    error: str = ""
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False
    latency_s: float = 0.0


class ChatClient(Protocol):
    """What an algorithm needs from an endpoint playing one role."""

    role: str
    model: str

    def ask(self, requests: list[ChatRequest], label: str = "") -> list[ChatResult]:
        """One result per request, in order."""
        ...


USAGE_COUNTS = (
    "rows",
    "ok",
    "failed",
    "budget",
    "cached",
    "requests",
    "prompt_tokens",
    "completion_tokens",
)


def usage(results: list[ChatResult], model: str) -> dict:
    """API accounting of one batch of results: what was asked, paid and answered from cache."""
    live = [r for r in results if not r.cached]
    paid = [r for r in live if r.status == "ok"]
    return {
        "model": model,
        "rows": len(results),
        "ok": sum(r.status == "ok" for r in results),
        "failed": sum(r.status == "failed" for r in results),
        "budget": sum(r.status == "budget" for r in results),
        "cached": len(results) - len(live),
        "requests": sum(r.attempts for r in live),
        "prompt_tokens": sum(r.prompt_tokens for r in paid),
        "completion_tokens": sum(r.completion_tokens for r in paid),
        "cost_usd": round(sum(r.cost_usd for r in live), 6),
    }


def merge_usage(*usages: dict) -> dict:
    """Several usage dicts of one role added up (empty dicts are skipped)."""
    total: dict = {}
    for u in usages:
        for k, v in u.items():
            if k == "model":
                total.setdefault(k, v)
            else:
                total[k] = total.get(k, 0) + v
    if "cost_usd" in total:
        total["cost_usd"] = round(total["cost_usd"], 6)
    return total
