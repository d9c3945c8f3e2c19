"""Can a request for Ray workers ever be granted? Checked before Ray is asked.

Ray queues a request that no node can hold and waits for it forever (Ray Train retries its
worker group every minute, Ray Data and Serve wait silently), so a stage that asks for six
2-CPU workers on an 8-CPU machine, or for a ninth GPU on eight, hangs the run. Here a
request (``count`` identical bundles, as every lion-ray stage asks) is compared with the
largest the cluster can ever be: each node's total resources, plus the nodes an autoscaler
may still add, minus what the run's own long-lived engines hold.

What an engine holds is placed bundle by bundle on nodes, as Ray places it: an engine of
8 x {1 CPU, 0.51 GPU} on 8 one-GPU nodes takes 0.51 GPU and 1 CPU on each, which leaves
0.49 GPU and the rest of the CPUs beside it on every node (not 4 whole GPUs on 4 nodes).
Pure logic: no Ray import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lion_ray.errors import LionError

# Ray's own bookkeeping resources; never asked for by lion-ray
_IGNORED = ("memory", "object_store_memory")
_EPS = 1e-9


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

    def asks(self) -> dict[str, float]:
        """The bundle without zero amounts and Ray's bookkeeping resources."""
        return {k: v for k, v in self.bundle.items() if v > 0 and k not in _IGNORED}


@dataclass
class Capacity:
    """The most each node can hold: alive nodes' totals, and the nodes an autoscaler may
    still add (``pending``: its node types' resources, up to their max count), less what the
    run's own engines hold (``held``: holder -> the bundles it holds)."""

    nodes: list[dict[str, float]]
    held: dict[str, Request] = field(default_factory=dict)
    pending: list[dict[str, float]] = field(default_factory=list)

    def fits(self, bundle: dict[str, float]) -> int:
        """How many ``bundle``s node by node, after the held bundles are placed."""
        free = free_nodes(self.nodes + self.pending, self.held, bundle)
        return sum(_per_node(node, bundle) for node in free)

    def held_total(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for request in self.held.values():
            for name, amount in request.total().items():
                total[name] = total.get(name, 0.0) + amount
        return total


def _per_node(node: dict[str, float], bundle: dict[str, float]) -> int:
    counts = []
    for name, need in bundle.items():
        if need <= 0 or name in _IGNORED:
            continue
        counts.append(math.floor(node.get(name, 0.0) / need + _EPS))
    return min(counts) if counts else 10**9


def _takes(node: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + _EPS >= v for k, v in bundle.items() if v > 0)


def free_nodes(
    nodes: list[dict[str, float]],
    held: dict[str, Request],
    for_bundle: dict[str, float] | None = None,
) -> list[dict[str, float]]:
    """What stays on each node once every held bundle is on a node that can take it whole.
    Each goes where it costs ``for_bundle`` (the request being checked) the least room
    (then where it fits tightest, as Ray's best fit does): an upper bound on what the
    request can get. A held bundle that fits on no node raises (the engine could not run)."""
    free = [{k: v for k, v in n.items() if k not in _IGNORED} for n in nodes]
    want = {k: v for k, v in (for_bundle or {}).items() if v > 0 and k not in _IGNORED}
    for holder, request in held.items():
        bundle = request.asks()
        spread = request.strategy == "STRICT_SPREAD"
        used: set[int] = set()
        for _ in range(request.count):
            candidates = [
                i for i, n in enumerate(free) if _takes(n, bundle) and not (spread and i in used)
            ]
            if not candidates:
                raise ResourcesUnavailable(
                    f"{holder} holds {request.count} x {{{_shape(bundle)}}}, which this "
                    f"cluster cannot hold at all. {request.fix}".strip()
                )

            best = min(candidates, key=lambda i, b=bundle: _placement_cost(free[i], b, want, i))
            for k, v in bundle.items():
                free[best][k] = free[best].get(k, 0.0) - v
            used.add(best)
    return free


def _placement_cost(node: dict, bundle: dict, want: dict, index: int) -> tuple:
    """Where a held bundle goes: the fewest of the checked request's bundles lost on that
    node, then the tightest fit (Ray's best fit), then the first node."""
    after = {k: node.get(k, 0.0) - bundle.get(k, 0.0) for k in node}
    lost = (_per_node(node, want) - _per_node(after, want)) if want else 0
    return (lost, sum(after.get(k, 0.0) for k in bundle), index)


def possible(request: Request, capacity: Capacity, *, alive_only: bool = False) -> int:
    """How many of the request's bundles the cluster can ever hold beside what is held
    (``alive_only``: on the nodes up now, without the autoscaler's)."""
    bundle = request.asks()
    nodes = capacity.nodes if alive_only else capacity.nodes + capacity.pending
    free = free_nodes(nodes, capacity.held, bundle)
    per_node = [_per_node(node, bundle) for node in free]
    if request.strategy == "STRICT_SPREAD":
        return sum(1 for k in per_node if k > 0)
    return sum(per_node)


def shortfall(request: Request, capacity: Capacity) -> str | None:
    """Why ``request`` can never be granted on ``capacity``, or None when it can."""
    try:
        can = possible(request, capacity)
    except ResourcesUnavailable as exc:
        return str(exc)
    if can >= request.count:
        return None
    bundle = request.asks()
    free = free_nodes(capacity.nodes + capacity.pending, capacity.held, bundle)
    # name the resource that runs out: the one with the fewest bundles' worth in the cluster
    totals = {name: sum(n.get(name, 0.0) for n in free) for name in bundle}
    scarce = min(bundle, key=lambda name: totals[name] / bundle[name])
    largest = max((n.get(scarce, 0.0) for n in free), default=0.0)
    need = bundle[scarce] * request.count
    parts = [
        f"{request.what} asks for {request.count} x {{{_shape(bundle)}}} = {_num(need)} "
        f"{scarce} in all" + (", one per node" if request.strategy == "STRICT_SPREAD" else ""),
        f"but this cluster can ever give it at most {can} of them: {_num(totals[scarce])} "
        f"{scarce} over {len(free)} node(s), at most {_num(largest)} {scarce} on one node",
    ]
    if capacity.held and any(capacity.held_total().get(k) for k in bundle):
        held = "; ".join(
            f"{holder} holds {r.count} x {{{_shape(r.asks())}}}"
            for holder, r in capacity.held.items()
        )
        parts.append(f"after what the run's engines hold ({held})")
    if capacity.pending:
        parts.append(f"counting {len(capacity.pending)} node(s) the autoscaler may still add")
    message = "; ".join(parts) + "."
    if request.fix:
        message += f" {request.fix}"
    return message


def needs_scaling(request: Request, capacity: Capacity) -> bool:
    """Whether the request fits only once the autoscaler has added nodes."""
    if not capacity.pending:
        return False
    try:
        return possible(request, capacity, alive_only=True) < request.count
    except ResourcesUnavailable:  # the held engines themselves wait for new nodes
        return True


def check(request: Request, capacity: Capacity) -> None:
    """Raise :class:`ResourcesUnavailable` when ``request`` can never be granted."""
    problem = shortfall(request, capacity)
    if problem:
        raise ResourcesUnavailable(problem)


def describe(request: Request) -> str:
    """'imitation.train: Ray Train workers: 8 x {7 CPU, 1 GPU}'."""
    return f"{request.what}: {request.count} x {{{_shape(request.asks())}}}"


def _shape(bundle: dict[str, float]) -> str:
    return ", ".join(f"{_num(v)} {k}" for k, v in sorted(bundle.items()) if v)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
