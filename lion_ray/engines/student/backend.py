"""What a student backend does.

A backend holds one loaded student: it generates (a batch, or one request streamed), scores
losses, takes a new round's weights in place when it can, sleeps while training has the
accelerator, and closes. ``Replica`` only talks to this protocol, so a new backend is one
new file beside ``hf`` and ``vllm`` and one line in ``loading.load_backend``, the one place
a backend is chosen. Every method that computes is async: the hf backend runs its work in a
thread, vLLM's engine is async already.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from lion_ray.config import StudentConfig
from lion_ray.errors import LionError


class StaleWeights(LionError):
    """vLLM reported a weight reload, but the model answers as before (vllm#32718)."""


class TornWeights(LionError):
    """A weight reload failed part way: the engine may hold a mix of two rounds."""


class StudentBackend(Protocol):
    format: object  # lion_ray.formats.PromptFormat: the student's own prompt format
    position_limit: int  # the longest prompt + answer the engine takes, in tokens
    inflight: int  # requests using this backend now (a swap waits for 0)
    batches_requests: bool  # whether Serve's dynamic batching helps (hf) or not (vLLM)

    async def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seeds: list[int | None],
    ) -> list[dict | BaseException]:
        """One result per prompt (answer, finish_reason, prompt_tokens, completion_tokens),
        or the exception that failed that prompt alone."""

    def stream(
        self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, seed=None
    ) -> AsyncIterator[dict]:
        """Text deltas ({"delta": str}) as they come, then one {"finish": {...}}."""

    async def losses(self, items: list[tuple[str, str, str]], max_length: int) -> list[float]:
        """The mean per-token loss of each (instruction, input, answer) on the tokens
        training learns from it at ``max_length``."""

    async def prepare_reload(self, model_dir: str):
        """What an in-place reload of ``model_dir`` needs, or None: only a new engine can."""

    async def apply_reload(self, prepared) -> None:
        """Move the prepared weights in (no request is running)."""

    async def sleep(self) -> None: ...

    async def wake(self) -> None: ...

    def healthy(self) -> bool: ...

    def close(self) -> None: ...


def fit_prompt(ids: list[int], context: int, max_new_tokens: int) -> list[int]:
    """A prompt that fits the context with room to answer: a short prompt is kept whole
    (the answer gets what the context leaves); a long one loses tokens from its start,
    keeping at least half the context (or max_new_tokens, if less) for the answer. Every
    backend and every path (serving, stages, ray.data.llm) cuts prompts by this rule."""
    answer = min(max_new_tokens, context // 2)
    return ids[-(context - answer) :]


def student_format(student: StudentConfig, model_uri: str):
    """The student's prompt format, from its tokenizer alone (the weights stay where they are)."""
    from lion_ray.formats import PromptFormat
    from lion_ray.models import load_tokenizer, local_tokenizer_dir

    return PromptFormat(
        load_tokenizer(local_tokenizer_dir(model_uri), student.trust_remote_code),
        student.prompt_format,
        student.system_prompt,
    )
