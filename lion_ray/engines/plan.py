"""What a run asks its cluster for, step by step, and what it already holds at each step.

    for step in run_plan(cfg):
        preflight(step.request, step.held)          # a running run (driver.check_resources)
    report = fit(cfg, nodes, pending)               # a manifest, no Ray (`lion-ray config fit`)

One list for both, so the check before a launch and the check at a run's start agree. The
run's engines live for the whole run once started (the API workers of each role, the
student engine), so each step's ``held`` is what the steps before it started and still hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lion_ray.config import LionConfig
from lion_ray.logic.resources import Capacity, Request, needs_scaling, shortfall

STUDENT_ENGINE = "the student engine"  # its name in what a session holds
API_WORKER_CPUS = 0.25  # I/O bound: fractional CPUs keep 2-core machines from deadlocking


@dataclass
class Step:
    name: str  # "imitation.train (rounds 2+, beside the sleeping engine)"
    request: Request
    held: dict[str, Request] = field(default_factory=dict)


def api_workers_request(role: str, num_actors: int) -> Request:
    return Request(
        f"{role} API workers",
        {"CPU": API_WORKER_CPUS},
        num_actors,
        fix=f"Lower {role}.num_actors.",
    )


def run_plan(cfg: LionConfig) -> list[Step]:
    """The run's resource requests in the order it makes them."""
    from lion_ray.engines.inference import engines_request
    from lion_ray.engines.student.engine import engine_request
    from lion_ray.engines.training import workers_request

    student, train, loop = cfg.student, cfg.train, cfg.loop
    steps: list[Step] = []
    held: dict[str, Request] = {}
    roles = ["teacher", "generator"] + (["referee"] if loop.selection == "referee" else [])
    for role in roles:
        request = api_workers_request(role, cfg.endpoints()[role].num_actors)
        steps.append(Step(f"{role} API workers", request, dict(held)))
        held[f"the {role} API workers"] = request
    needs_student = loop.selection != "random" or (
        loop.seed_pool == "sandbox" and bool(cfg.sandbox.heldout_tasks)
    )
    if student.colocate:  # round 1 trains before the engine starts: a whole GPU each
        steps.append(
            Step("imitation.train (round 1, before the engine)", workers_request(train), held)
        )
    beside = False
    if needs_student and student.engine == "resident":
        engine = engine_request(student, cfg.serve, train)
        steps.append(Step("the student engine (all rounds)", engine, dict(held)))
        held = held | {STUDENT_ENGINE: engine}
        beside = student.colocate
    elif needs_student:
        steps.append(Step("student engines (each student stage)", engines_request(student), held))
    name = "imitation.train" + (" (rounds 2+, beside the sleeping engine)" if beside else "")
    steps.append(Step(name, workers_request(train, colocated=beside), held))
    return steps


@dataclass
class Fit:
    step: Step
    problem: str | None  # why it can never fit, or None
    scales: bool  # it fits only once the autoscaler has added nodes


def fit(
    cfg: LionConfig, nodes: list[dict[str, float]], pending: list[dict[str, float]]
) -> list[Fit]:
    """Each step of ``run_plan`` against a cluster of ``nodes`` (up) and ``pending`` (that
    an autoscaler may add)."""
    out = []
    for step in run_plan(cfg):
        capacity = Capacity(nodes, step.held, pending)
        out.append(
            Fit(step, shortfall(step.request, capacity), needs_scaling(step.request, capacity))
        )
    return out
