"""Connecting to (or starting) Ray, the same way for the CLI, the driver and `ray job submit`."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

import ray

from lion_ray.config import ClusterConfig

log = logging.getLogger("lion_ray")


def default_num_cpus() -> int:
    # Ray Data needs CPU slots for read tasks beside the actors; on a 2-core machine a
    # logical count equal to the physical one deadlocks (DESIGN section 4).
    return max(8, 2 * (os.cpu_count() or 1))


def init_ray(
    cluster: ClusterConfig | None = None, *, quiet: bool = False, log_file: str | None = None
) -> str | None:
    """Connect to the configured cluster, or start a local one. Returns the dashboard URL.
    ``quiet``: workers' output is not streamed here; ``log_file``: Ray's and the libraries'
    messages go there instead of the console."""
    cluster = cluster or ClusterConfig()
    if ray.is_initialized():
        node = getattr(ray._private.worker, "_global_node", None)
        url = getattr(node, "webui_url", None)
    else:
        address = cluster.address or os.environ.get("RAY_ADDRESS")
        kwargs: dict = {"log_to_driver": not quiet, "logging_level": logging.WARNING}
        if log_file:  # until its lines go to the file, Ray's console shows errors only
            kwargs["logging_level"] = logging.ERROR
        if address:
            ctx = ray.init(address=address, **kwargs)
        else:
            ctx = start_local_ray(cluster.num_cpus or default_num_cpus(), **kwargs)
        url = ctx.dashboard_url
    if log_file:
        log_to_file(log_file)
    data_context_quiet()
    return f"http://{url}" if url and not str(url).startswith("http") else url


# Ray gives a local cluster's dashboard 60 s to come up (RAY_DASHBOARD_STARTUP_TIMEOUT_S); on 2
# cores beside another run it has taken over 80 s. A slow start is better than a failed run.
DASHBOARD_STARTUP_TIMEOUT_S = 300


def start_local_ray(num_cpus: int, attempts: int = 2, **kwargs):
    """``ray.init(address="local")``: a new cluster even if a `ray start` one runs here, tried
    ``attempts`` times. On a loaded machine a start can fail: Ray 2.60's raylet gives its
    dashboard agent a fixed 15 s to write its port files and aborts when the agent's imports
    take longer ("Timed out waiting for file .../metrics_agent_port_..."); the next start
    finds those imports in the page cache. A failed start's processes are stopped first."""
    import psutil
    from ray._private import ray_constants

    if "RAY_DASHBOARD_STARTUP_TIMEOUT_S" not in os.environ:  # read at import: set the value
        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = DASHBOARD_STARTUP_TIMEOUT_S
    me = psutil.Process()
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            return ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, **kwargs)
        except Exception as exc:
            with contextlib.suppress(Exception):  # the start's own error is the one to keep
                ray.shutdown()
            # ray.shutdown does not stop what a failed start left (the GCS, the dashboard)
            left = _ray_processes([p for p in me.children(recursive=True) if p.pid not in before])
            for proc in left:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(left, timeout=10)
            if attempt == attempts:
                raise
            log.warning(
                "a local Ray did not start (%s); starting it again",
                (str(exc).splitlines() or [type(exc).__name__])[0][:300],
            )
    raise AssertionError("unreachable")


def _ray_processes(procs: list) -> list:
    """Of ``procs``, Ray's own (the GCS, raylet, dashboard and agents: programs in Ray's
    package) and what they started; a process another thread started meanwhile is left."""
    import psutil

    ray_dir = os.path.dirname(ray.__file__)
    found: dict[int, psutil.Process] = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if ray_dir in " ".join(proc.cmdline()):
                found[proc.pid] = proc
                found.update((c.pid, c) for c in proc.children(recursive=True))
    return list(found.values())


# Loggers of the libraries whose internal notices (restarts, deprecations, progress) go to a
# run's log file rather than its console, unless --verbose.
LIBRARY_LOGGERS = (
    "ray",
    "ray.data",
    "ray.train",
    "ray.serve",
    "ray.llm",
    "DeepSpeed",
    "deepspeed",
    "transformers",
    "vllm",
    "py.warnings",
)


def log_to_file(path: str) -> None:
    """Send the libraries' own log lines and Python warnings to ``path`` (appended), so the
    console shows lion-ray's progress and results; worker output stays in Ray's session
    logs (``ray.init(log_to_driver=False)``)."""
    handler = _FILE_HANDLERS.get(path)
    if handler is None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handler = _FILE_HANDLERS[path] = logging.FileHandler(path)
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    import ray.serve  # noqa: F401  (its import puts up a console handler: replaced below)

    logging.captureWarnings(True)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # its save/load progress bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if type(old) is not logging.FileHandler:  # Ray's and Serve's console handlers
                logger.removeHandler(old)
        if handler not in logger.handlers:
            logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger("ray").setLevel(logging.INFO)  # the file keeps Ray's notices
    # the raylet's notices (worker start-up counts, OOM kills) are printed by the driver's
    # error thread, which log_to_driver does not cover; they stay in Ray's session logs
    ray._private.worker._worker_logs_enabled = False


_FILE_HANDLERS: dict[str, logging.FileHandler] = {}


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


def preflight(request, also_held: dict[str, dict[str, float]] | None = None) -> None:
    """Refuse, before Ray is asked, a ``logic.resources.Request`` that this cluster can never
    grant (Ray would queue it forever) while the run's engines hold what they hold (and
    ``also_held``: engines not started yet that will be up at the same time)."""
    from lion_ray.logic.resources import Capacity, check

    holders = HELD | (also_held or {})
    held: dict[str, float] = {}
    for resources in holders.values():
        for name, amount in resources.items():
            held[name] = held.get(name, 0.0) + amount
    check(request, Capacity(node_capacity(), held, " and ".join(sorted(holders))))
