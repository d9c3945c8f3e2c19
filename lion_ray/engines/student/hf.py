"""The hf backend: a student as a transformers model in this process (CPU or one GPU).

``HFGenerator`` is the plain compute class (batched generate with left padding, streaming,
losses, in-place weight moves); the per-stage Ray Data actors use it as it is, and
``HFBackend`` adapts it to the async ``StudentBackend`` protocol a serving replica uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import AsyncIterator, Iterator

from lion_ray.config import StudentConfig
from lion_ray.engines.student.backend import fit_prompt
from lion_ray.errors import LionError
from lion_ray.models import is_adapter


class HFGenerator:
    """Batched transformers generation on prompts in the student's own format.

    Prompts are token ids from :class:`~lion_ray.formats.PromptFormat` (exactly what the
    student trained on), sorted by length before batching (less padding), left-padded; only
    the generated tokens are decoded. ``finish_reason`` is ``stop`` when an end token
    (EOS / end of turn) was produced, else ``length``.
    """

    def __init__(
        self,
        model_uri: str,
        *,
        prompt_format: str = "alpaca",
        system: str = "",
        dtype: str = "auto",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int = 32,
        device: str | None = None,
        seed: int = 0,
    ):
        import torch

        from lion_ray.formats import PromptFormat
        from lion_ray.models import load_causal_lm, load_tokenizer, local_model_dir

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # the prompt format first: it can fail (a chat format without a template), and the
        # weights would then have been loaded onto the device for nothing
        tokenizer_dir = local_model_dir(model_uri)
        self.tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code)
        self.format = PromptFormat(self.tokenizer, prompt_format, system)
        model, tokenizer_dir = load_causal_lm(
            model_uri,
            dtype=dtype,
            device=self.device,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
        self.model = model.eval()
        self.model_dir = tokenizer_dir
        self.adapter = is_adapter(tokenizer_dir)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.batch_size = batch_size
        self.seed = seed
        self._sampling_lock = threading.Lock()
        config = getattr(self.model, "config", None)
        self.position_limit = getattr(config, "max_position_embeddings", 2048)
        self.asleep = False

    @classmethod
    def for_student(cls, model_uri: str, student: StudentConfig) -> HFGenerator:
        return cls(
            model_uri,
            prompt_format=student.prompt_format,
            system=student.system_prompt,
            dtype=student.dtype,
            attn_implementation=student.attn_implementation,
            trust_remote_code=student.trust_remote_code,
            max_new_tokens=student.max_new_tokens,
            temperature=student.temperature,
            top_p=student.top_p,
            batch_size=student.batch_size,
            seed=student.seed,
        )

    def healthy(self) -> bool:
        """A transformers model in this process cannot die apart from it."""
        return True

    def sleep(self) -> None:
        """Give the accelerator to training (student.colocate): the model waits in host
        memory until the next reload or request."""
        if self.device != "cpu" and not self.asleep:
            self.model.to("cpu")
            self.torch.cuda.empty_cache()
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.model.to(self.device)
            self.asleep = False

    def prepare_reload(self, model_uri: str):
        """The new checkpoint's weights on CPU, ready to copy into this model in place, or
        None when it cannot be (an adapter on either side, another architecture)."""
        from lion_ray.models import fits_in_place, local_model_dir
        from lion_ray.weights import load_tensors

        new_dir = local_model_dir(model_uri)
        if self.adapter or is_adapter(new_dir) or not fits_in_place(self.model_dir, new_dir):
            return None
        return new_dir, load_tensors(new_dir)

    def apply_reload(self, prepared) -> None:
        """Copy the prepared weights into the loaded model (no request may be running)."""
        new_dir, state = prepared
        own = self.model.state_dict()
        given = {own[k].data_ptr() for k in state if k in own}
        # a key the checkpoint leaves out is fine only when it is tied to one it has
        untied = [k for k in own if k not in state and own[k].data_ptr() not in given]
        unexpected = [k for k in state if k not in own]
        if untied or unexpected:
            raise LionError(
                f"{new_dir} does not fit the loaded model: missing {untied[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        self.model.load_state_dict(state, strict=False)  # copies in place, casting the dtype
        self.model_dir = new_dir
        self.wake()

    def fit(self, ids: list[int], max_new_tokens: int | None = None) -> list[int]:
        return fit_prompt(ids, self.position_limit, max_new_tokens or self.max_new_tokens)

    def generate(self, items: list[tuple[str, str]], **sampling) -> list[dict]:
        """One result per (instruction, input): answer, finish_reason, token counts."""
        return self.generate_ids([self.format.prompt_ids(i, x) for i, x in items], **sampling)

    def generate_ids(
        self,
        prompts: list[list[int]],
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seeds: list[int | None] | None = None,
    ) -> list[dict]:
        """Like :meth:`generate` for prompts already as token ids; sampling overrides the
        defaults given at construction. ``seeds``: each prompt's own (a batch samples from
        one random stream, seeded by its rows' seeds)."""
        self.wake()
        encoded = [self.fit(p, max_new_tokens) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda k: len(encoded[k]))
        results: list[dict | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self._generate_batch(
                [encoded[k] for k in idx],
                max_new_tokens,
                temperature,
                top_p,
                [seeds[k] for k in idx] if seeds else None,
            )
            for k, res in zip(idx, batch, strict=True):
                results[k] = res
        return results  # type: ignore[return-value]

    def losses(
        self, items: list[tuple[str, str, str]], max_length: int | None = None
    ) -> list[float]:
        """The mean per-token loss of each (instruction, input, answer): the same ids, the
        same masking and the same truncation the student trains with at ``max_length``
        (train.max_length; the model's context when not given)."""
        torch = self.torch
        self.wake()
        limit = min(max_length or self.position_limit, self.position_limit)
        examples = [self.format.example(i, x, a, limit) for i, x, a in items]
        order = sorted(range(len(items)), key=lambda k: len(examples[k].input_ids))
        out: list[float] = [0.0] * len(items)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(examples[k].input_ids) for k in idx)
            ids = torch.full((len(idx), width), self.tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full((len(idx), width), -100, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for row, k in enumerate(idx):  # right-padded: positions match training's
                n = len(examples[k].input_ids)
                ids[row, :n] = torch.tensor(examples[k].input_ids)
                labels[row, :n] = torch.tensor(examples[k].labels)
                attention[row, :n] = 1
            with torch.no_grad():
                logits = self.model(
                    input_ids=ids.to(self.device), attention_mask=attention.to(self.device)
                ).logits.float()
            shifted, targets = logits[:, :-1], labels[:, 1:].to(self.device)
            token_loss = torch.nn.functional.cross_entropy(
                shifted.reshape(-1, shifted.size(-1)),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="none",
            ).view(targets.shape)
            counted = (targets != -100).sum(dim=1).clamp(min=1)
            for row, k in enumerate(idx):
                out[k] = float(token_loss[row].sum() / counted[row])
        return out

    def _sampling(self, max_new_tokens, temperature, top_p) -> dict:
        temperature = self.temperature if temperature is None else temperature
        sample = temperature > 0
        return {
            "max_new_tokens": max_new_tokens or self.max_new_tokens,
            "do_sample": sample,
            "temperature": temperature if sample else None,
            "top_p": (self.top_p if top_p is None else top_p) if sample else None,
            "eos_token_id": self.format.stop_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
        }

    def _finish(self, ids: list[int], gen: list[int]) -> dict:
        stop = next((k for k, t in enumerate(gen) if t in self.format.stop_ids), None)
        if stop is not None:
            gen = gen[: stop + 1]
        text = self.tokenizer.decode(gen, skip_special_tokens=True)
        return {
            "answer": text.strip(),
            "finish_reason": "stop" if stop is not None else "length",
            "prompt_tokens": len(ids),
            "completion_tokens": len(gen),
        }

    def _generate_batch(
        self,
        batch_ids: list[list[int]],
        max_new_tokens=None,
        temperature=None,
        top_p=None,
        seeds: list[int | None] | None = None,
    ) -> list[dict]:
        torch = self.torch
        width = max(len(x) for x in batch_ids)
        input_ids = torch.full(
            (len(batch_ids), width), self.tokenizer.pad_token_id, dtype=torch.long
        )
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(batch_ids):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        sampling = self._sampling(max_new_tokens, temperature, top_p)
        sampling["max_new_tokens"] = min(sampling["max_new_tokens"], self.position_limit - width)
        # sampling draws from torch's one global generator: calls in other threads (a
        # serving replica's concurrent batches) must not reseed it mid-generate
        with self._sampling_lock if sampling["do_sample"] else contextlib.nullcontext():
            if sampling["do_sample"]:  # reproducible per batch content, whatever its order
                what = repr(seeds) if seeds and None not in seeds else repr(batch_ids)
                torch.manual_seed(self.seed + _digest(what))
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    **sampling,
                )
        return [
            self._finish(ids, gen)
            for ids, gen in zip(batch_ids, out[:, width:].tolist(), strict=True)
        ]

    def stream_ids(
        self,
        ids: list[int],
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[dict]:
        """Text deltas as they are generated ({"delta": str}), then one final {"finish": ...};
        ``seed``: the request's own (OpenAI's ``seed``), when it samples."""
        from transformers import TextIteratorStreamer

        self.wake()
        ids = self.fit(ids, max_new_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        output: dict = {}
        sampling = self._sampling(max_new_tokens, temperature, top_p)
        sampling["max_new_tokens"] = min(sampling["max_new_tokens"], self.position_limit - len(ids))

        def run() -> None:
            sample = sampling["do_sample"]
            with self._sampling_lock if sample else contextlib.nullcontext(), self.torch.no_grad():
                if sample:
                    self.torch.manual_seed(
                        self.seed + _digest(repr(seed if seed is not None else ids))
                    )
                output["ids"] = self.model.generate(
                    input_ids=self.torch.tensor([ids], device=self.device),
                    attention_mask=self.torch.ones(
                        (1, len(ids)), dtype=self.torch.long, device=self.device
                    ),
                    streamer=streamer,
                    **sampling,
                )[0, len(ids) :].tolist()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        for text in streamer:
            if text:
                yield {"delta": text}
        thread.join()
        yield {"finish": self._finish(ids, output.get("ids", []))}


def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


class HFBackend:
    """:class:`HFGenerator` behind the ``StudentBackend`` protocol: each call in a thread."""

    batches_requests = True  # one generate() over a batch is cheaper than one per request

    def __init__(self, generator: HFGenerator):
        self.generator = generator
        self.format = generator.format
        self.position_limit = generator.position_limit
        self.inflight = 0

    @classmethod
    def for_student(cls, model_uri: str, student: StudentConfig) -> HFBackend:
        return cls(HFGenerator.for_student(model_uri, student))

    async def generate(self, prompts, max_new_tokens, temperature, top_p, seeds):
        try:
            return await asyncio.to_thread(
                self.generator.generate_ids, prompts, max_new_tokens, temperature, top_p, seeds
            )
        except Exception as exc:  # the batch fails together: each row carries the error
            return [exc] * len(prompts)

    async def stream(
        self, ids, max_new_tokens, temperature, top_p, seed=None
    ) -> AsyncIterator[dict]:
        it = self.generator.stream_ids(ids, max_new_tokens, temperature, top_p, seed)
        while True:
            item = await asyncio.to_thread(next, it, None)
            if item is None:
                return
            yield item

    async def losses(self, items, max_length=None):
        return await asyncio.to_thread(self.generator.losses, items, max_length)

    async def prepare_reload(self, model_dir):
        return await asyncio.to_thread(self.generator.prepare_reload, model_dir)

    async def apply_reload(self, prepared):
        await asyncio.to_thread(self.generator.apply_reload, prepared)

    async def sleep(self):
        await asyncio.to_thread(self.generator.sleep)

    async def wake(self):
        await asyncio.to_thread(self.generator.wake)

    def healthy(self) -> bool:
        return self.generator.healthy()

    def close(self) -> None:
        """The model is freed with the last reference to it (no process of its own)."""
        self.generator = None
