"""The built wheel works with no checkout: its configs, its chat page, its CLI, a whole round."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the checkout: a build writes build/ and lion_ray.egg-info into
    its source tree, where `make test`'s background install of .venv-vllm writes too."""
    source = tmp_path_factory.mktemp("source") / "lion-ray"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv*",
            "runs",
            "build",
            "dist",
            "test-artifacts",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
        ),
    )
    out = tmp_path_factory.mktemp("dist")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (whl,) = out.glob("lion_ray-*.whl")
    return whl


def test_the_wheel_carries_configs_and_the_chat_page(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"lion_ray/configs/demo.yaml", "lion_ray/configs/paper.yaml"} <= names
    assert "lion_ray/serving_static/index.html" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


@pytest.mark.slow
def test_a_round_from_a_wheel_install_outside_the_checkout(wheel, tmp_path):
    """A fresh venv with only the wheel installed in it (its dependencies are this
    environment's, reached through a .pth, so the test needs no index), run from a
    directory that is not the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = Path(
        subprocess.run(
            [
                venv / "bin" / "python",
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    res = subprocess.run(
        [
            venv / "bin" / "python",
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    # Only now the dependencies, by a plain path line (which does not run this environment's
    # editable-install finder). Before the install, pip would have seen this environment's
    # lion-ray there and uninstalled it.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {
        "RAY_ADDRESS": "",
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
    }
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import lion_ray; print(lion_ray.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), where  # the wheel's copy, not the checkout
    import importlib.metadata

    assert importlib.metadata.distribution("lion-ray")  # this environment's install is intact
    assert (Path(sys.executable).parent / "lion-ray").exists()
    run = subprocess.run(
        [venv / "bin" / "lion-ray", "run", "--config", "demo", "--no-progress"]
        + ["--set", "loop.rounds=1", "--set", "sandbox.seed_tasks=40"]
        + ["--set", "sandbox.heldout_tasks=20", "--set", "train.epochs=1"]
        + ["--set", "student.tiny.num_layers=1", "--set", "student.tiny.hidden_size=64"]
        + ["--set", "student.tiny.num_heads=1", "--set", "student.tiny.intermediate_size=128"]
        + ["--set", "loop.hard_per_round=10", "--set", "loop.easy_per_round=5"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    manifest = json.loads((work / "runs" / "demo" / "manifest.json").read_text())
    assert manifest["finished_rounds"] == 1
    assert (work / "runs" / "demo" / "round_1" / "imitation" / "model" / "config.json").exists()
