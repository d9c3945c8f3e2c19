"""The one place a student backend is chosen."""

from __future__ import annotations

from lion_ray.config import StudentConfig
from lion_ray.engines.student.backend import StudentBackend


def load_backend(
    model_dir: str, student: StudentConfig, backend: str, max_model_len: int | None = None
) -> StudentBackend:
    """The student at ``model_dir`` on ``backend`` ('hf' or 'vllm'), with room for
    ``max_model_len`` tokens of prompt and answer."""
    if backend == "vllm":
        from lion_ray.engines.student.vllm import VLLMBackend

        return VLLMBackend(model_dir, student, max_model_len)
    from lion_ray.engines.student.hf import HFBackend

    return HFBackend.for_student(model_dir, student)
