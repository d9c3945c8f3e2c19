"""Can a request for Ray workers ever be granted? Checked before Ray is asked.

Ray queues a request that no node can hold and waits for it forever (Ray Train retries its
worker group every minute, Ray Data and Serve wait silently), so a stage that asks for six
2-CPU workers on an 8-CPU machine, or for a ninth GPU on eight, hangs the run. Here a
request (``count`` identical bundles, as every lion-ray stage asks) is compared with the
largest the cluster can ever be: each node's total resources, plus the nodes an autoscaler
may still add, minus what the run's own long-lived engines hold. Pure logic: no Ray import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lion_ray.errors import LionError

# Ray's own bookkeeping resources; never asked for by lion-ray
_IGNORED = ("memory", "object_store_memory")


class ResourcesUnavailable(LionError):
    """A stage asked for more than the cluster can ever give it."""


@dataclass(frozen=True)
class Request:
    """``count`` identical bundles, e.g. 8 Ray Train workers of {CPU: 8, GPU: 1}."""

    what: str  # "imitation.train: 6 Ray Train workers"
    bundle: dict[str, float]
    count: int
    strategy: str = "PACK"  # PACK | SPREAD | STRICT_SPREAD (one bundle per node)
    fix: str = ""  # what to change, named as config fields

    def total(self) -> dict[str, float]:
        """All the bundles' resources together."""
        return {k: v * self.count for k, v in self.bundle.items() if v}


@dataclass
class Capacity:
    """The most each node can hold: alive nodes' totals, the nodes an autoscaler may add
    (its node types' resources x their max count), less what the run itself holds."""

    nodes: list[dict[str, float]]
    held: dict[str, float] = field(default_factory=dict)  # our resident engines' resources
    held_by: str = ""  # who holds them, for the message

    def fits(self, bundle: dict[str, float]) -> int:
        """How many ``bundle``s node by node, after taking ``held`` off the largest nodes."""
        free = _after_held([dict(n) for n in self.nodes], self.held)
        return sum(_per_node(node, bundle) for node in free)


def _per_node(node: dict[str, float], bundle: dict[str, float]) -> int:
    counts = []
    for name, need in bundle.items():
        if need <= 0 or name in _IGNORED:
            continue
        have = node.get(name, 0.0)
        counts.append(math.floor(have / need + 1e-9))
    return min(counts) if counts else 10**9


def _after_held(nodes: list[dict[str, float]], held: dict[str, float]) -> list[dict[str, float]]:
    """Take what the run holds off the nodes that have most of it: an upper bound on what
    stays (the held actors may sit elsewhere, which leaves less, never more, for a bundle
    that needs the same node)."""
    for name, amount in held.items():
        left = amount
        for node in sorted(nodes, key=lambda n: -n.get(name, 0.0)):
            take = min(left, node.get(name, 0.0))
            if take > 0:
                node[name] = node.get(name, 0.0) - take
                left -= take
    return nodes


def shortfall(request: Request, capacity: Capacity) -> str | None:
    """Why ``request`` can never be granted on ``capacity``, or None when it can."""
    bundle = {k: v for k, v in request.bundle.items() if v > 0 and k not in _IGNORED}
    free = _after_held([dict(n) for n in capacity.nodes], capacity.held)
    per_node = [_per_node(node, bundle) for node in free]
    possible = (
        sum(1 for k in per_node if k > 0) if request.strategy == "STRICT_SPREAD" else sum(per_node)
    )
    if possible >= request.count:
        return None
    # name the resource that runs out: the one with the fewest bundles' worth in the cluster
    totals = {name: sum(n.get(name, 0.0) for n in free) for name in bundle}
    scarce = min(bundle, key=lambda name: totals[name] / bundle[name])
    largest = max((n.get(scarce, 0.0) for n in free), default=0.0)
    need = bundle[scarce] * request.count
    shape = ", ".join(f"{_num(v)} {k}" for k, v in sorted(bundle.items()))
    parts = [
        f"{request.what} asks for {request.count} x {{{shape}}} = {_num(need)} {scarce} in all"
        + (", one per node" if request.strategy == "STRICT_SPREAD" else ""),
        f"but this cluster can ever give it at most {possible} of them: {_num(totals[scarce])} "
        f"{scarce} over {len(free)} node(s), at most {_num(largest)} {scarce} on one node",
    ]
    if capacity.held and any(capacity.held.get(k) for k in bundle):
        held = ", ".join(f"{_num(v)} {k}" for k, v in sorted(capacity.held.items()) if v)
        parts.append(f"after what {capacity.held_by or 'the run'} holds ({held})")
    message = "; ".join(parts) + "."
    if request.fix:
        message += f" {request.fix}"
    return message


def check(request: Request, capacity: Capacity) -> None:
    """Raise :class:`ResourcesUnavailable` when ``request`` can never be granted."""
    problem = shortfall(request, capacity)
    if problem:
        raise ResourcesUnavailable(problem)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
