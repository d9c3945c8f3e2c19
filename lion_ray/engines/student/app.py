"""Deploying the student: a Serve application for ``lion-ray serve``, ``serve run`` and
RayService, and the run's engine.

    lion-ray serve --run runs/demo          # the newest round's student, swapped as rounds finish
    lion-ray serve --model runs/demo/round_3/imitation/model
    serve run lion_ray.engines.student.app:build_app model_dir=...   # Serve config / RayService
"""

from __future__ import annotations

import os

from ray import serve

from lion_ray.config import ServeConfig, StudentConfig, check_vllm_replica
from lion_ray.engines.student.guard import resolve_access
from lion_ray.engines.student.routes import StudentServer
from lion_ray.engines.student.runs import newest_model, run_student
from lion_ray.engines.student.vllm import VLLM_CPU_ENV
from lion_ray.errors import LionError

APP_NAME = "lion-student"


def build_app(args: dict):
    """A Serve application for ``serve run``/RayService: args are model_dir or run_dir, and
    optionally prompt_format (or its old name, template), system_prompt and any ServeConfig
    field (strings, as Serve passes them). A run directory's own student settings win."""
    fields = set(ServeConfig.model_fields)
    settings = ServeConfig.model_validate({k: v for k, v in args.items() if k in fields})
    student = StudentConfig(
        prompt_format=args.get("prompt_format", args.get("template", "alpaca")),
        system_prompt=args.get("system_prompt", ""),
    )
    return student_app(
        settings, student=student, model_dir=args.get("model_dir"), run_dir=args.get("run_dir")
    )


def student_app(
    settings: ServeConfig,
    *,
    student: StudentConfig,
    model_dir: str | None = None,
    run_dir: str | None = None,
    target: str | None = None,
    asleep: bool = False,
    engine: dict | None = None,
):
    """The bound Serve application (with body-size limit, replicas and backpressure). With
    ``run_dir``, the prompt format is the one the run trained with, whatever path deploys it
    (CLI, ray job, RayService). ``engine``: a run's engine, {"id", "record"} (see
    ``runs.engine_record``)."""
    if not model_dir and not run_dir:
        raise ValueError("give model_dir (one student) or run_dir (the newest round's student)")
    if run_dir and not model_dir and not newest_model(run_dir):
        raise LionError(f"{run_dir}: no round has finished training yet; nothing to serve")
    if run_dir:
        student = run_student(run_dir, student)
    check_vllm_replica(settings, student)
    access = resolve_access(settings)  # before anything starts: fail closed
    resources_ = {"num_cpus": settings.cpus_per_replica}
    if settings.gpus_per_replica:
        resources_["num_gpus"] = settings.gpus_per_replica
    if settings.backend == "vllm" and student.vllm_device == "cpu":
        resources_["runtime_env"] = {"env_vars": VLLM_CPU_ENV}
    deployment = StudentServer.options(
        num_replicas=settings.num_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        ray_actor_options=resources_,
        # what a replica is told on start (``reconfigure``): the model to serve (``target``,
        # else the one it started with) and whether to sleep. Deployed again from Python,
        # the app gets a new code version and Serve replaces the replicas (a rolling update);
        # the run's engine moves weights by broadcast instead (StudentEngine.load)
        user_config={"model_dir": target or model_dir, "asleep": asleep} if model_dir else {},
    )
    return deployment.bind(
        {
            "serve": settings.model_dump(),
            "student": student.model_dump(),
            "model_dir": model_dir,
            "run_dir": run_dir,
            "access": access,
            "engine": engine,
        }
    )


def replicas_request(settings: ServeConfig):
    """What a deployment of ``settings`` asks Ray for (checked before Ray is asked)."""
    from lion_ray.logic.resources import Request

    return Request(
        "serving replicas",
        {"CPU": settings.cpus_per_replica, "GPU": settings.gpus_per_replica},
        settings.num_replicas,
        fix="Lower serve.num_replicas, serve.cpus_per_replica or serve.gpus_per_replica (for "
        "the run's engine: student.num_engines, cpus_per_engine), or add nodes.",
    )


# Serve's controller gives a new HTTP proxy 5 s to answer its ready check, then kills it, and
# serve.start fails ("ProxyActor ... killed by `ray.kill`"): seen in the test suite on 2 busy
# cores, where the proxy's process took longer to start. A slow node is better than a failed run.
PROXY_READY_CHECK_TIMEOUT_S = 60


def start_serve(**options) -> None:
    """``serve.start`` with a controller that waits ``PROXY_READY_CHECK_TIMEOUT_S`` for each
    proxy (``RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S`` in this process's environment overrides
    it; serve.start itself waits 60 s at most). A Serve already running on the cluster keeps
    its own controller and settings."""
    name = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
    timeout = os.environ.get(name, str(PROXY_READY_CHECK_TIMEOUT_S))
    try:
        valid = float(timeout) > 0
    except ValueError:
        valid = False
    if not valid:  # the controller would fail at import, with a less helpful error
        raise LionError(f"${name} is {timeout!r}: set it to a number of seconds above 0")
    serve.start(controller_options={"runtime_env": {"env_vars": {name: timeout}}}, **options)


def deploy(
    settings: ServeConfig,
    *,
    student: StudentConfig,
    model_dir: str | None = None,
    run_dir: str | None = None,
    name: str = APP_NAME,
    route_prefix: str | None = "/",
    engine: dict | None = None,
    held=None,
) -> str | None:
    """Start (or update in place) the student app on the connected Ray cluster; returns its
    URL (None with no ``route_prefix``: reached through handles only). ``held``: what the
    run's other engines hold (checked with the replicas before Ray is asked).

    Deploying again with another model_dir is a rolling update: Serve starts replicas on the
    new student and retires the old ones once they have (no request is dropped).
    """
    from lion_ray.engines.cluster import preflight

    preflight(replicas_request(settings), held)
    if route_prefix is None:  # reached through handles only: no HTTP proxy needed
        start_serve(proxy_location="Disabled")
    else:
        start_serve(http_options={"host": settings.host, "port": settings.port})
    serve.run(
        student_app(settings, student=student, model_dir=model_dir, run_dir=run_dir, engine=engine),
        name=name,
        route_prefix=route_prefix,
    )
    if route_prefix is None:
        return None
    # a Serve already running on this cluster keeps its own address
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    return f"http://{host}:{http.port}{route_prefix.rstrip('/')}"
