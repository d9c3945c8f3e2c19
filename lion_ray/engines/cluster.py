"""Connecting to (or starting) Ray, the same way for the CLI, the driver and `ray job submit`."""

from __future__ import annotations

import logging
import os
import warnings

import ray

from lion_ray.config import ClusterConfig

log = logging.getLogger("lion_ray")


def default_num_cpus() -> int:
    # Ray Data needs CPU slots for read tasks beside the actors; on a 2-core machine a
    # logical count equal to the physical one deadlocks (DESIGN section 4).
    return max(8, 2 * (os.cpu_count() or 1))


def init_ray(cluster: ClusterConfig | None = None, *, quiet: bool = False) -> str | None:
    """Connect to the configured cluster, or start a local one. Returns the dashboard URL."""
    cluster = cluster or ClusterConfig()
    if ray.is_initialized():
        node = getattr(ray._private.worker, "_global_node", None)
        url = getattr(node, "webui_url", None)
    else:
        address = cluster.address or os.environ.get("RAY_ADDRESS")
        kwargs: dict = {"log_to_driver": not quiet, "logging_level": logging.WARNING}
        if address:
            ctx = ray.init(address=address, **kwargs)
        else:
            ctx = ray.init(  # "local": a new cluster even if a `ray start` one runs here
                address="local",
                num_cpus=cluster.num_cpus or default_num_cpus(),
                include_dashboard=True,
                **kwargs,
            )
        url = ctx.dashboard_url
    data_context_quiet()
    return f"http://{url}" if url and not str(url).startswith("http") else url


def data_context_quiet() -> None:
    """lion-ray draws its own progress bars; Ray Data's would interleave with them."""
    # Small waves (a few re-asks, the last generator wave) have fewer blocks than actors;
    # Ray Data warns about the idle actors, which is expected and harmless here.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = False


# What the run's own long-lived engines hold (a serving replica, resident API workers): a
# stage cannot have it while they live. name -> resources; set by whoever starts them.
HELD: dict[str, dict[str, float]] = {}


def node_capacity() -> list[dict[str, float]]:
    """Each alive node's total resources, plus the nodes an autoscaler may still add."""
    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    return nodes + autoscaler_headroom()


def autoscaler_headroom() -> list[dict[str, float]]:
    """Nodes the autoscaler may still start (its node types' resources, up to their max
    count, less those running), where the cluster reports them; [] without an autoscaler."""
    return []


def preflight(request) -> None:
    """Refuse, before Ray is asked, a ``logic.resources.Request`` that this cluster can never
    grant (Ray would queue it forever)."""
    from lion_ray.logic.resources import Capacity, check

    held: dict[str, float] = {}
    for resources in HELD.values():
        for name, amount in resources.items():
            held[name] = held.get(name, 0.0) + amount
    check(request, Capacity(node_capacity(), held, " and ".join(sorted(HELD))))
