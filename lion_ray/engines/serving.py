"""The old home of the student's Serve deployment, kept for one release as a re-export: the
code lives in :mod:`lion_ray.engines.student` (``app``: deploy and build_app; ``routes``:
the deployment; ``replica``: the lifecycle; ``vllm``/``hf``: the backends). RayService
configs that name ``lion_ray.engines.serving:build_app`` keep working."""

from lion_ray.engines.student.app import (  # noqa: F401
    APP_NAME,
    PROXY_READY_CHECK_TIMEOUT_S,
    build_app,
    deploy,
    replicas_request,
    start_serve,
    student_app,
)
from lion_ray.engines.student.guard import REPLICA, configure_replica, resolve_access  # noqa: F401
from lion_ray.engines.student.routes import StudentServer  # noqa: F401
