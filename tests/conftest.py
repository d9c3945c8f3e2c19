"""Shared fixtures. Tests mirror the package: tests/logic/ for lion_ray/logic/, and so on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SEED_TASKS = DATA / "alpaca_seed_tasks.jsonl"  # the 175 self-instruct seed tasks (public)

# One intra-op thread for torch (in this process and every process it starts: `lion-ray`
# drivers, Ray and its workers). The tests' models are tiny, and on a loaded 2-core machine
# two OpenMP threads wait on each other at every op: teaching a tiny student its three
# answers (tests/helpers.py memorize) took 78 s with two threads and 1.1 s with one, beside
# one busy process. Set before torch is first imported; a value already set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray processes the tests' Rays would start and never use (the environment reaches every Ray
# the tests start: `ray start` heads, `lion-ray` drivers' local Rays, and their workers). On 2
# cores each is a second or more of imports beside the tests that do work:
# - workers prestarted for a Ray's first driver, most of which no task takes;
# - Ray Data's usage-stats actor (nothing is reported from here anyway);
# - Ray Train's preemption watcher, one actor per training (no test drains a node).
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray's log monitor lists its node's log directory every 0.1 s until it follows 1000 files, and
# the directory gains files with every worker: with this, every 0.5 s (Ray's pace above the
# threshold). Measured beside 900 log files: 4.0 CPU-s a minute by default, 1.7 with it.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# Serve replicas read their bearer keys from the environment they inherit from the Ray node,
# so the keys are set before the session's Ray starts (never passed in a runtime env).
SERVE_KEYS_ENV = "LION_TEST_SERVE_KEYS"
os.environ[SERVE_KEYS_ENV] = "test-key-1,test-key-2"
ADMIN_KEYS_ENV = "LION_TEST_ADMIN_KEYS"
os.environ[ADMIN_KEYS_ENV] = "admin-key-1"


# The test files that take longest (minutes of end-to-end runs each), longest first. Under
# `make test` (pytest-xdist, a file per worker, --no-loadscope-reorder) they start first and
# the short files fill in beside them: in collection order the longest file came last and
# ran alone at the end. Measured from a clean clone's --durations; a file not named here
# keeps its place after these.
LONGEST_FIRST = (
    "tests/test_driver.py",
    "tests/test_object_store.py",
    "tests/engines/test_training.py",
    "tests/test_driver_variants.py",
    "tests/engines/test_students.py",
    "tests/cluster/test_local_cluster.py",
    "tests/test_weights.py",
    "tests/test_packaging.py",
    "tests/test_streaming.py",
    "tests/test_cli.py",
    "tests/engines/test_cluster.py",
    "tests/engines/test_serving.py",
    "tests/engines/test_api.py",
    "tests/test_evaluation.py",
)


def pytest_collection_modifyitems(config, items):
    """vLLM tests run in the vLLM tier's environment (`make test-vllm`); GPU tests where
    torch sees a CUDA device (`python -m bench.gpu_smoke`). Elsewhere they skip and say why
    (`make test` deselects both kinds from the main tier, so they are not reported there).
    The longest files go first (LONGEST_FIRST)."""
    import importlib.util

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))

    has_vllm = importlib.util.find_spec("vllm") is not None
    cuda = None
    for item in items:
        if "gpu" in item.keywords:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(
                    pytest.mark.skip(reason="needs a CUDA GPU: run `python -m bench.gpu_smoke`")
                )
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(
                pytest.mark.skip(reason="vLLM is not installed here: run `make test-vllm`")
            )


@pytest.fixture(scope="session")
def seed_tasks_path() -> Path:
    return SEED_TASKS


@pytest.fixture(scope="session")
def seed_instructions() -> list[str]:
    import json

    return [json.loads(line)["instruction"] for line in SEED_TASKS.read_text().splitlines()]


@pytest.fixture(scope="session")
def sandbox():
    """A sandbox server with no limits or faults, on a free port, for the whole session."""
    from lion_ray.sandbox.server import SandboxProcess

    with SandboxProcess() as server:
        yield server


@pytest.fixture()
def openai_client(sandbox):
    from openai import OpenAI

    return OpenAI(base_url=sandbox.base_url, api_key="unused", max_retries=0, timeout=30)


LOGICAL_GPUS = 4


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (8 logical CPUs on any machine: DESIGN section 4; 4
    logical GPUs, which Ray assigns as on GPU nodes: placement is tested here), without the
    dashboard, which no test here reads."""
    import ray
    import torch

    from lion_ray.config import ClusterConfig
    from lion_ray.engines.cluster import init_ray

    # logical GPUs only where there are none: on a GPU machine Ray counts the real ones
    gpus = None if torch.cuda.is_available() else LOGICAL_GPUS
    init_ray(ClusterConfig(num_cpus=8, num_gpus=gpus, dashboard=False), quiet=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_cluster():
    """A `ray start` head of 8 logical CPUs for this pytest worker, that `lion-ray run`
    processes connect to (``cluster.address``) where a test is not about starting Ray or
    killing a run: each such run would start a whole local Ray of its own (GCS, raylet,
    dashboard, agents), which on 2 loaded cores is the slowest and least certain part. It has
    no dashboard (`start-head.sh --no-dashboard`): runs only connect to it."""
    from .helpers import LocalCluster

    with LocalCluster(workers=0, cpus=8, dashboard=False) as cluster:
        cluster.address = f"127.0.0.1:{cluster.port}"
        yield cluster


def sandbox_endpoint(server, **overrides):
    """An EndpointConfig pointing at a sandbox server, fast retries for tests."""
    from lion_ray.config import EndpointConfig

    fields = {
        "base_url": server.base_url,
        "model": "sandbox",
        "max_tokens": 64,
        "num_actors": 2,
        "concurrency": 8,
        "requests_per_minute": 60_000,
        "tokens_per_minute": 10_000_000,
    }
    return EndpointConfig(**(fields | overrides))


def sandbox_engine(server, run_dir, role: str = "teacher", resident: bool = True, **overrides):
    """The real API engine for one role against a sandbox server, its cache and spend ledger
    under ``run_dir``."""
    from lion_ray.engines.api import ApiEngine

    return ApiEngine(
        sandbox_endpoint(server, **overrides),
        role=role,
        cache_dir=f"{run_dir}/cache/{role}",
        ledger_dir=f"{run_dir}/spend/{role}",
        batch_dir=f"{run_dir}/batches/{role}",
        show_progress=False,
        resident=resident,
    )


def _tiny(tmp_path_factory, name: str):
    from lion_ray.config import TinyStudentConfig
    from lion_ray.student import init_student

    out = tmp_path_factory.mktemp("students") / name
    init_student(
        str(out),
        TinyStudentConfig(
            hidden_size=64,
            num_layers=2,
            num_heads=1,
            intermediate_size=128,
            max_position_embeddings=256,
        ),
    )
    return out


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory):
    """A freshly initialised tiny student (random weights) in Hugging Face format."""
    return _tiny(tmp_path_factory, "tiny")


MEMORIZED = [("Reverse 'kato'.", "otak"), ("What is 17 + 25?", "42"), ("Uppercase 'mixo'.", "MIXO")]
MEMORIZED_B = [
    ("Reverse 'kato'.", "bbbb"),
    ("What is 17 + 25?", "99"),
    ("Uppercase 'mixo'.", "BBBB"),
]


def _taught(tmp_path_factory, name: str, pairs: list[tuple[str, str]]):
    from .helpers import memorize

    out = _tiny(tmp_path_factory, name)
    memorize(out, pairs)
    return out


@pytest.fixture(scope="session")
def taught_student(tmp_path_factory):
    """A tiny student that answers MEMORIZED exactly and then stops (EOS)."""
    return _taught(tmp_path_factory, "taught", MEMORIZED)


@pytest.fixture(scope="session")
def taught_student_b(tmp_path_factory):
    """A second student with different answers: tells which model served a request."""
    return _taught(tmp_path_factory, "taught_b", MEMORIZED_B)
