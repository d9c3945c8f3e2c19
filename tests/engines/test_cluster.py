"""Ray and Serve on a loaded machine: a local start that fails is cleaned up and made again,
and a Serve proxy that starts slowly is waited for."""

import json
import os
import subprocess
import sys

import pytest

# Holds the dashboard agent at start-up (once, while the marker file is missing) past the
# 15 s in which Ray's raylet waits for the agent's port files, as a loaded machine did.
SLOW_AGENT = """
import os, sys, time
if any(a.endswith(os.path.join("dashboard", "agent.py")) for a in sys.argv):
    marker = os.environ["SLOW_AGENT_ONCE"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(40)
"""

START = """
import json, logging, subprocess, threading, time, psutil, ray
from lion_ray.config import ClusterConfig
from lion_ray.engines.cluster import init_ray

logging.basicConfig(level=logging.WARNING)
# a process of the program's own, started while the first Ray start is under way
other = []
threading.Thread(target=lambda: (time.sleep(3), other.append(subprocess.Popen(["sleep", "300"])))).start()
init_ray(ClusterConfig(num_cpus=2), quiet=True)
names = [p.name() for p in psutil.Process().children(recursive=True)]
print(json.dumps({
    "cpus": ray.cluster_resources().get("CPU"),
    "gcs": names.count("gcs_server"),
    "other_alive": bool(other) and other[0].poll() is None,
}))
other[0].kill()
ray.shutdown()
"""


def _run_slowed(tmp_path, sitecustomize: str, program: str, *args: str, **env):
    """Run ``program`` in a fresh Python whose processes (Ray's included: they inherit the
    environment) load ``sitecustomize`` first; ``env`` adds variables (None removes one).
    Asserts it succeeded."""
    (tmp_path / "sitecustomize.py").write_text(sitecustomize)
    path = os.pathsep.join(p for p in [str(tmp_path), os.environ.get("PYTHONPATH", "")] if p)
    full = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": path, **env}
    res = subprocess.run(
        [sys.executable, "-c", program, *args],
        env={k: v for k, v in full.items() if v is not None},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_a_local_start_that_fails_is_cleaned_up_and_made_again(tmp_path):
    res = _run_slowed(tmp_path, SLOW_AGENT, START, SLOW_AGENT_ONCE=str(tmp_path / "slowed"))
    assert (tmp_path / "slowed").exists()  # the first start did meet the slow agent
    assert "a local Ray did not start" in res.stderr and "starting it again" in res.stderr
    started = json.loads(res.stdout.strip().splitlines()[-1])
    # one cluster up, with the configured CPUs: the failed start's GCS was stopped, and
    # only Ray's processes were
    assert started == {"cpus": 2.0, "gcs": 1, "other_alive": True}


# Holds every new Ray worker process 20 s at start-up (none is prestarted, so each actor
# gets a new one), as 2 busy cores did: Serve's HTTP proxy then misses the 3 ready checks of
# 5 s that Serve's default gives it, is killed, and serve.start fails (checked by hand with
# RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=5).
SLOW_WORKERS = """
import sys, time
if any(a.endswith("default_worker.py") for a in sys.argv):
    time.sleep(20)
"""

SERVE = """
import json, sys, ray
from ray import serve
from lion_ray.config import ClusterConfig
from lion_ray.engines.cluster import init_ray
from lion_ray.engines.serving import start_serve

init_ray(ClusterConfig(num_cpus=2), quiet=True)
start_serve(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
print(json.dumps({"proxies": len(serve.status().proxies)}))
serve.shutdown()
ray.shutdown()
"""


@pytest.mark.slow
def test_serve_waits_for_a_proxy_that_starts_slowly(tmp_path):
    from ..helpers import free_port

    res = _run_slowed(
        tmp_path,
        SLOW_WORKERS,
        SERVE,
        str(free_port()),
        RAY_prestart_worker_first_driver="0",
        RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=None,  # lion-ray's own setting applies
    )
    printed = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert printed and json.loads(printed[-1]) == {"proxies": 1}, res.stdout[-2000:]


@pytest.mark.parametrize("value", ["abc", "0"])
def test_a_proxy_timeout_that_is_not_a_positive_number_is_refused_before_serve_starts(
    monkeypatch, value
):
    from lion_ray.engines.serving import start_serve
    from lion_ray.errors import LionError

    monkeypatch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", value)
    with pytest.raises(LionError, match=r"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S is .* above 0"):
        start_serve(http_options={"host": "127.0.0.1", "port": 1})


def test_the_autoscaler_headroom_counts_each_group_up_to_its_maximum():
    """KubeRay nodes carry their group's name as a label; nodes without it are matched by
    their CPU and GPU count."""
    from lion_ray.config import NodeTypeConfig
    from lion_ray.engines.cluster import autoscaler_headroom

    gpu = NodeTypeConfig(name="gpu-workers", resources={"CPU": 8, "GPU": 1}, max_count=8)
    cpu = NodeTypeConfig(name="cpu-workers", resources={"CPU": 16}, max_count=2)
    alive = [
        {"Resources": {"CPU": 8.0}, "Labels": {"ray.io/node-group": "headgroup"}},
        {"Resources": {"CPU": 8.0, "GPU": 1.0}, "Labels": {"ray.io/node-group": "gpu-workers"}},
        {"Resources": {"CPU": 16.0}, "Labels": {}},  # no group label: known by its shape
    ]
    pending = autoscaler_headroom(alive, [gpu, cpu])
    assert pending.count({"CPU": 8.0, "GPU": 1.0}) == 7 and pending.count({"CPU": 16.0}) == 1
    assert autoscaler_headroom(alive, []) == []


def test_a_local_start_is_tried_again_and_its_last_failure_is_one_line(monkeypatch):
    """Ray's start waits are fixed (15 s for the agent, 30 s for the node): on a loaded
    machine a start is tried again after a pause, and one that never comes up fails with
    the cause and what to do, not a traceback. (A fake ray.init: the real slowed start is
    the test above.)"""
    import ray

    from lion_ray.engines import cluster
    from lion_ray.errors import LionError

    tries = []

    def slow_start(**kwargs):
        tries.append(kwargs)
        if len(tries) < 3:
            raise Exception("The current node timed out during startup. This could happen...")
        return "started"

    monkeypatch.setattr(ray, "init", slow_start)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    assert cluster.start_local_ray(4, pause_s=0.01) == "started" and len(tries) == 3
    tries.clear()

    def never(**kwargs):
        tries.append(kwargs)
        raise Exception("The current node timed out during startup.\nmore lines")

    monkeypatch.setattr(ray, "init", never)
    with pytest.raises(LionError) as caught:
        cluster.start_local_ray(4, attempts=2, pause_s=0.01)
    message = str(caught.value)
    assert len(tries) == 2 and "\n" not in message
    assert "did not start in 2 tries (last: The current node timed out" in message
    assert "cluster.address" in message


def test_a_local_ray_started_without_the_dashboard_runs_none_of_its_web_modules(ray_local):
    """cluster.dashboard=false (the test session's Ray is started so): the dashboard process
    loads none of its web modules, each of which is a process of its own, and there is no URL
    for a run to print."""
    import psutil

    from lion_ray.config import ClusterConfig
    from lion_ray.engines.cluster import init_ray

    started = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
    assert any("dashboard.py" in cmd for cmd in started)  # the head's own, with no modules
    assert not [cmd for cmd in started if cmd.startswith("ray-dashboard-")]
    assert not init_ray(ClusterConfig(dashboard=False))
