"""The old home of the run's student engine, kept for one release as a re-export: the code
lives in :mod:`lion_ray.engines.student.engine`."""

from lion_ray.engines.student.engine import (  # noqa: F401
    COLOCATED_ENGINE_GPU,
    COLOCATED_WORKER_GPU,
    StudentEngine,
    call_engine,
    engine_settings,
)
