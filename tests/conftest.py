"""Shared fixtures. Tests mirror the package: tests/logic/ for lion_ray/logic/, and so on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SEED_TASKS = DATA / "alpaca_seed_tasks.jsonl"  # the 175 self-instruct seed tasks (public)

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
