"""Connecting to (or starting) Ray, the same way for the CLI, the driver and `ray job submit`."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

import ray

from lion_ray.config import ClusterConfig
from lion_ray.errors import LionError

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
            if cluster.num_gpus is not None:
                kwargs["num_gpus"] = cluster.num_gpus
            ctx = start_local_ray(
                cluster.num_cpus or default_num_cpus(), dashboard=cluster.dashboard, **kwargs
            )
        url = ctx.dashboard_url
    set_scaling(cluster)
    if log_file:
        log_to_file(log_file)
    data_context_quiet()
    return f"http://{url}" if url and not str(url).startswith("http") else url


# Ray gives a local cluster's dashboard 60 s to come up (RAY_DASHBOARD_STARTUP_TIMEOUT_S); on 2
# cores beside another run it has taken over 80 s. A slow start is better than a failed run.
DASHBOARD_STARTUP_TIMEOUT_S = 300


def start_local_ray(
    num_cpus: int, attempts: int = 3, pause_s: float = 10.0, dashboard: bool = True, **kwargs
):
    """``ray.init(address="local")``: a new cluster even if a `ray start` one runs here, tried
    ``attempts`` times, ``pause_s`` more between each. On a loaded machine a start can fail:
    Ray 2.60's raylet gives its dashboard agent a fixed 15 s to write its port files and
    aborts when the agent's imports take longer ("Timed out waiting for file
    .../metrics_agent_port_..."), and the node itself a fixed 30 s to register with the GCS
    ("The current node timed out during startup"); neither can be set, but the next start
    finds the imports in the page cache and the machine perhaps less busy. A failed start's
    processes are stopped first. The last failure is one line: what failed, and what to do."""
    import time

    import psutil
    from ray._private import ray_constants

    if "RAY_DASHBOARD_STARTUP_TIMEOUT_S" not in os.environ:  # read at import: set the value
        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = DASHBOARD_STARTUP_TIMEOUT_S
    me = psutil.Process()
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            return ray.init(
                address="local", num_cpus=num_cpus, include_dashboard=dashboard, **kwargs
            )
        except Exception as exc:
            with contextlib.suppress(Exception):  # the start's own error is the one to keep
                ray.shutdown()
            # ray.shutdown does not stop what a failed start left (the GCS, the dashboard)
            left = _ray_processes([p for p in me.children(recursive=True) if p.pid not in before])
            for proc in left:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(left, timeout=10)
            cause = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            if attempt == attempts:
                raise LionError(
                    f"a local Ray did not start in {attempts} tries (last: {cause}); this "
                    "machine may be too busy for Ray's fixed start-up waits: rerun when it is "
                    "quieter, or start one (`ray start --head`) and set cluster.address"
                ) from exc
            log.warning("a local Ray did not start (%s); starting it again", cause)
            time.sleep(pause_s * attempt)
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


def process_tree_rss_mib(pid: int | None = None) -> float:
    """Resident memory of a process (this one by default) and all its descendants, in MiB:
    a replica and its vLLM engine core, a benchmark's driver and its Ray."""
    import psutil

    top = psutil.Process(pid)
    total = 0
    for proc in [top, *top.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a child may end while it is counted
            total += proc.memory_info().rss
    return round(total / 2**20, 1)


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
    "lion_ray.trace",  # a failed stage's whole traceback (the console shows its cause)
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


# What the connected cluster can grow to (cluster.node_types) and how long a stage waits for
# it: facts about the cluster this process connected to, set by init_ray.
_SCALING: dict = {"node_types": [], "timeout_s": 900.0}
NODE_GROUP_LABEL = "ray.io/node-group"  # KubeRay puts each pod's groupName here


def set_scaling(cluster: ClusterConfig) -> None:
    _SCALING["node_types"] = list(cluster.node_types)
    _SCALING["timeout_s"] = cluster.autoscale_timeout_s


def node_capacity() -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """(each alive node's total resources, the nodes an autoscaler may still add)."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return [dict(n["Resources"]) for n in alive], autoscaler_headroom(alive, _SCALING["node_types"])


def autoscaler_headroom(alive: list[dict], node_types: list) -> list[dict[str, float]]:
    """Nodes the autoscaler may still start: each node type's resources, up to its max count,
    less the nodes of that type already up (known by KubeRay's group label, or else by the
    same CPU and GPU count)."""
    pending: list[dict[str, float]] = []
    for node_type in node_types:
        shape = {k: float(v) for k, v in node_type.resources.items()}
        up = sum(1 for node in alive if _of_type(node, node_type.name, shape))
        pending += [dict(shape) for _ in range(max(0, node_type.max_count - up))]
    return pending


def _of_type(node: dict, name: str, shape: dict[str, float]) -> bool:
    group = (node.get("Labels") or {}).get(NODE_GROUP_LABEL)
    if group is not None:
        return group == name
    have = node.get("Resources") or {}
    return all(abs(have.get(k, 0.0) - shape.get(k, 0.0)) < 1e-6 for k in ("CPU", "GPU"))


def preflight(request, held: dict | None = None, *, wait: bool = True) -> bool:
    """Refuse, before Ray is asked, a ``logic.resources.Request`` that this cluster can never
    grant (Ray would queue it forever) beside what the run's engines hold (``held``: holder
    -> Request, e.g. a session's ``holdings``). A request that fits only on nodes an
    autoscaler may still add is asked of the autoscaler (with what is held) and, with
    ``wait``, waited for, up to cluster.autoscale_timeout_s; without, nothing is asked and
    the answer says whether it would need to be (True)."""
    from lion_ray.logic.resources import Capacity, check, needs_scaling

    alive, pending = node_capacity()
    capacity = Capacity(alive, dict(held or {}), pending)
    check(request, capacity)
    scales = needs_scaling(request, capacity)
    if scales and wait:
        ask_autoscaler([request, *capacity.held.values()])
        wait_for_nodes(request, capacity.held)
    return scales


def ask_autoscaler(requests: list) -> None:
    """Tell the autoscaler what the run needs at once (its bundles), so that it starts the
    nodes now; it keeps them while the request stands (each ask replaces the last)."""
    from ray.autoscaler.sdk import request_resources

    from lion_ray.logic.resources import describe

    request_resources(bundles=[r.asks() for r in requests for _ in range(r.count)])
    log.warning("asked the autoscaler for %s", "; ".join(describe(r) for r in requests))


def wait_for_nodes(request, held: dict, poll_s: float = 5.0) -> None:
    """Until the nodes up now can hold ``request`` beside ``held``, or the deadline."""
    import time

    from lion_ray.logic.resources import Capacity, ResourcesUnavailable, describe, possible

    deadline = time.monotonic() + _SCALING["timeout_s"]
    said = 0.0
    while True:
        alive, _ = node_capacity()
        try:
            have = possible(request, Capacity(alive, held))
        except ResourcesUnavailable:
            have = 0
        if have >= request.count:
            return
        now = time.monotonic()
        if now > deadline:
            raise ResourcesUnavailable(
                f"{request.what}: waited {_SCALING['timeout_s']:g} s for the autoscaler to "
                f"add nodes for {describe(request)}; the {len(alive)} node(s) "
                f"up hold {have}. Check the autoscaler's log (KubeRay: the operator and the "
                "head's autoscaler container), or raise cluster.autoscale_timeout_s"
            )
        if now - said > 60:
            log.warning(
                "%s: waiting for the autoscaler (%d of %d fit on the %d node(s) up)",
                request.what,
                have,
                request.count,
                len(alive),
            )
            said = now
        time.sleep(poll_s)
