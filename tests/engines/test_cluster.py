"""Starting a local Ray on a loaded machine: a start that fails is cleaned up and made again."""

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


@pytest.mark.slow
def test_a_local_start_that_fails_is_cleaned_up_and_made_again(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SLOW_AGENT)
    env = {
        **os.environ,
        "RAY_ADDRESS": "",
        "PYTHONPATH": os.pathsep.join(
            p for p in [str(tmp_path), os.environ.get("PYTHONPATH", "")] if p
        ),
        "SLOW_AGENT_ONCE": str(tmp_path / "slowed"),
    }
    res = subprocess.run(
        [sys.executable, "-c", START], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "slowed").exists()  # the first start did meet the slow agent
    assert "a local Ray did not start" in res.stderr and "starting it again" in res.stderr
    started = json.loads(res.stdout.strip().splitlines()[-1])
    # one cluster up, with the configured CPUs: the failed start's GCS was stopped, and
    # only Ray's processes were
    assert started == {"cpus": 2.0, "gcs": 1, "other_alive": True}
