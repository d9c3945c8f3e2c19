"""Imitation fine-tuning: Ray Train's TorchTrainer with DeepSpeed ZeRO inside the loop.

    metrics = train_student(answers, cfg.train, base_model=..., out_uri=..., storage_path=...)

* ZeRO-2 or ZeRO-3 (optionally offloading optimizer state and parameters), bf16 on GPU and
  fp32 on CPU (gloo), gradient accumulation, cosine schedule with warmup, clipping.
* Data: the answers table through a Ray Data shard per worker (rows whose teacher answer
  failed are skipped and counted), encoded with the training template and loss masking,
  optionally packed. Rows are re-ordered by id across workers so the data order, and so a
  resumed run, does not depend on how Ray Data happened to split the blocks.
* Checkpoints every N optimizer steps through ``ray.train.report``; ``FailureConfig``
  restores workers from the latest one, and a rerun with the same storage path and name
  (after a driver crash) restores too. The final model is exported in Hugging Face format.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import threading
import time
from typing import Any

import pyarrow as pa

from lion_ray import storage
from lion_ray.config import StudentConfig, TrainConfig
from lion_ray.errors import LionError
from lion_ray.logic.examples import Sequence, pack, pad_batch, unpacked


def deepspeed_config(train: TrainConfig, use_gpu: bool) -> dict:
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_gpu},
        # torch's AdamW: no JIT build of DeepSpeed's fused Adam on CPU (offload uses CPUAdam)
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "weight_decay": train.weight_decay,
                "torch_adam": not train.offload_optimizer,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_sequences(rows: list[dict], fmt, max_length: int, packing: bool):
    """Encoded (and packed) training sequences plus counts, from answer rows, in the
    student's prompt format (``fmt``: a :class:`~lion_ray.formats.PromptFormat`)."""
    examples = [fmt.example(r["instruction"], r["input"], r["answer"], max_length) for r in rows]
    seqs = pack(examples, max_length) if packing else unpacked(examples)
    stats = {
        "examples": len(examples),
        "truncated": sum(e.truncated for e in examples),
        "target_tokens": sum(e.target_tokens for e in examples),
        "tokens": sum(len(e.input_ids) for e in examples),
        "sequences": len(seqs),
    }
    return seqs, stats


def _load_for_training(config: dict, train: TrainConfig, use_gpu: bool):
    """(model, tokenizer, full base dir, export dtype): the base in the compute dtype,
    wrapped in a LoRA adapter when asked (the previous round's, trainable, when it exported
    one), gradient checkpointing on if asked."""
    import torch
    from transformers import AutoModelForCausalLM

    from lion_ray.config import StudentConfig
    from lion_ray.models import (
        adapter_base,
        checkpoint_dtype,
        is_adapter,
        load_tokenizer,
        local_model_dir,
    )

    student = StudentConfig.model_validate(config["student"])
    model_dir = local_model_dir(config["base_model"])
    previous_adapter = is_adapter(model_dir)
    base_dir = local_model_dir(adapter_base(model_dir)) if previous_adapter else model_dir
    if previous_adapter and train.lora is None:
        raise LionError(
            f"{config['base_model']} is a LoRA adapter, but train.lora is not set; set train.lora "
            "to train it further, or start from a merged model"
        )
    kwargs = {"dtype": torch.bfloat16 if use_gpu else torch.float32}
    if student.attn_implementation:
        kwargs["attn_implementation"] = student.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, trust_remote_code=student.trust_remote_code, **kwargs
    )
    model.config.use_cache = False
    if train.lora is not None:
        from peft import PeftModel, get_peft_model

        if previous_adapter:  # the next round trains the same adapter further
            model = PeftModel.from_pretrained(model, model_dir, is_trainable=True)
        else:
            model = get_peft_model(model, peft_config(train))
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if train.lora is not None:
            model.enable_input_require_grads()
    tokenizer = load_tokenizer(model_dir, student.trust_remote_code)
    return model, tokenizer, base_dir, checkpoint_dtype(base_dir)


def peft_config(train: TrainConfig):
    from peft import LoraConfig

    lora = train.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


def _progress_uri(storage_path: str, name: str) -> str:
    return storage.join(storage_path, name, "progress.json")


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: DeepSpeed engine, deterministic data order, checkpoints, export."""
    import warnings

    warnings.filterwarnings(
        "ignore", category=FutureWarning
    )  # deprecated collectives inside DeepSpeed
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from lion_ray.config import StudentConfig
    from lion_ray.formats import PromptFormat

    train = TrainConfig.model_validate(config["train"])
    student = StudentConfig.model_validate(config["student"])
    use_gpu = train.gpus_per_worker > 0
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")  # reuses Ray's group
    torch.manual_seed(train.seed)

    # Data: this worker's Ray Data shard, then a deterministic re-split by id.
    shard = ray.train.get_dataset_shard("train")
    mine = [dict(r) for r in shard.iter_rows()]
    gathered: list[list[dict]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, mine)
    rows = sorted((r for part in gathered for r in part), key=lambda r: r["id"])[rank::world]

    model, tokenizer, base_dir, export_dtype = _load_for_training(config, train, use_gpu)
    fmt = PromptFormat(tokenizer, student.prompt_format, student.system_prompt)
    seqs, data_stats = build_sequences(rows, fmt, train.max_length, train.packing)
    most_seqs = torch.tensor([len(seqs)], dtype=torch.long)
    dist.all_reduce(most_seqs, op=dist.ReduceOp.MAX)
    totals = torch.tensor(
        [data_stats[k] for k in ("examples", "target_tokens", "truncated", "sequences")],
        dtype=torch.long,
    )
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    # every worker runs the same number of micro-batches (ZeRO collectives must line up);
    # a worker with fewer sequences cycles through its own again
    batches_per_epoch = max(1, math.ceil(int(most_seqs) / train.micro_batch_size))
    total_micro = batches_per_epoch * train.epochs
    total_steps = max(1, math.ceil(total_micro / train.grad_accum_steps))
    warmup = math.ceil(train.warmup_ratio * total_steps)

    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        config=deepspeed_config(train, use_gpu),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, cosine_with_warmup(total_steps, warmup)
        ),
    )
    device = engine.device

    start_micro, resumed_from = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            # a LoRA checkpoint holds the adapter only; the frozen base comes from base_dir
            _, client = engine.load_checkpoint(
                ckpt_dir, tag="ds", load_module_strict=train.lora is None
            )
        start_micro = client["micro_step"]
        resumed_from = engine.global_steps  # restored by DeepSpeed with the optimizer state

    def batch_at(micro: int) -> tuple[dict, int]:
        """The micro-batch at ``micro`` and its count of real (non-padding) tokens."""
        epoch, k = divmod(micro, batches_per_epoch)
        order = list(range(len(seqs)))
        random.Random(train.seed * 7919 + epoch).shuffle(order)
        picked: list[Sequence] = (
            [
                seqs[order[(k * train.micro_batch_size + j) % len(order)]]
                for j in range(train.micro_batch_size)
            ]
            if seqs
            else []
        )
        padded = pad_batch(picked, tokenizer.pad_token_id)
        # no attention mask: right padding needs none, and position ids that restart at
        # each packed example make transformers attend within examples only
        batch = {
            k2: torch.tensor(padded[k2], device=device)
            for k2 in ("input_ids", "labels", "position_ids")
        }
        return batch, sum(len(p) for p in picked)

    losses: list[float] = []
    first_loss = mean_loss = None
    tokens_done = real_tokens = 0
    started = time.monotonic()
    last_progress = 0.0
    # fault injection for tests and failure drills: one worker dies once at this step
    crash_at, crash_marker = config.get("crash_at_step"), config["progress_uri"] + ".crashed"
    engine.train()
    for micro in range(start_micro, total_micro):
        batch, real = batch_at(micro)
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        tokens_done += int((batch["labels"] != -100).sum())
        real_tokens += real
        losses.append(float(loss))
        boundary = (micro + 1) % train.grad_accum_steps == 0 or micro + 1 == total_micro
        if not boundary:
            continue
        step = engine.global_steps
        mean = torch.tensor([sum(losses) / len(losses)])
        dist.all_reduce(mean)
        mean_loss = float(mean) / world
        losses = []
        if first_loss is None:
            first_loss = mean_loss
        if crash_at and step == crash_at and rank == world - 1 and not storage.exists(crash_marker):
            storage.write_text(crash_marker, "")
            os._exit(1)  # die like a preempted worker
        now = time.monotonic()
        if rank == 0 and (now - last_progress > 2 or step == total_steps):
            last_progress = now
            storage.write_json(
                config["progress_uri"],
                {
                    "step": step,
                    "total_steps": total_steps,
                    "loss": mean_loss,
                    "target_tokens_per_s": tokens_done * world / max(1e-6, now - started),
                },
            )
        metrics = {"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0]}
        if step % train.checkpoint_every_steps == 0 and step < total_steps:
            tmp = tempfile.mkdtemp(prefix="lion-ckpt-")
            engine.save_checkpoint(
                tmp,
                tag="ds",
                client_state={"micro_step": micro + 1},
                exclude_frozen_parameters=train.lora is not None,
            )
            # one directory name for all ranks, so every rank's ZeRO shards land together
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_{step:06d}",
            )
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started

    # Export in Hugging Face format, in the base checkpoint's dtype (ZeRO-3 gathers the
    # partitioned parameters first).
    out_uri = config["out_uri"]
    export_tmp = tempfile.mkdtemp(prefix="lion-export-") if rank == 0 else None
    params = [p for p in engine.module.parameters() if train.lora is None or p.requires_grad]
    gather = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        if train.zero_stage == 3
        else None
    )
    if gather:
        gather.__enter__()
    try:
        if rank == 0:
            export(engine.module, export_tmp, train, base_dir, export_dtype, config, out_uri)
    finally:
        if gather:
            gather.__exit__(None, None, None)
    final = {
        "step": engine.global_steps,
        "total_steps": total_steps,
        "loss_first": first_loss,
        "loss_last": mean_loss,
        "examples": int(totals[0]),
        "target_tokens": int(totals[1]),
        "truncated": int(totals[2]),
        "sequences": int(totals[3]),
        "target_tokens_per_s": tokens_done * world / max(1e-6, elapsed),
        "real_tokens_per_s": real_tokens * world / max(1e-6, elapsed),  # padding excluded
        "train_s": elapsed,
        "resumed_from_step": resumed_from,
        "exported": out_uri,
        "export_dtype": str(export_dtype).removeprefix("torch."),
        "parameters": sum(
            p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()
        ),
        "trainable_parameters": sum(
            p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable
        ),
    }
    import resource

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])  # MB
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    final["peak_rss_mb"] = round(float(peak), 1)  # the largest worker's peak resident memory
    nodes: list[str] = [""] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    final["worker_nodes"] = nodes
    if rank == 0:
        tokenizer.save_pretrained(export_tmp)
        storage.write_checksums(export_tmp)  # last: its presence says the export is complete
        _publish(export_tmp, out_uri)
        # Ray Train keeps the metrics of checkpointed reports; the final ones go beside them
        storage.write_json(config["progress_uri"].replace("progress.json", "final.json"), final)
    dist.barrier()
    ray.train.report(final)


def _state_in_dtype(module, dtype) -> dict:
    """The module's state on CPU in ``dtype``; tensors that share storage (tied embeddings)
    still share it, so save_pretrained writes them once, as the base has them."""
    import torch

    cast: dict[int, torch.Tensor] = {}
    state = {}
    for name, tensor in module.state_dict().items():
        key = tensor.data_ptr()
        if key not in cast:
            cast[key] = tensor.detach().to("cpu", dtype).clone()
        state[name] = cast[key]
    return state


def export(module, out_dir: str, train: TrainConfig, base_dir: str, dtype, config, out_uri):
    """Write the trained student: a full model, an adapter beside a pointer to its base, or
    the base with the adapter merged in. Always in the base checkpoint's dtype."""
    if train.lora is None:
        module.save_pretrained(out_dir, state_dict=_state_in_dtype(module, dtype))
        return
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from lion_ray.models import adapter_base, is_adapter, local_model_dir, write_base_pointer

    adapter = {
        k: v.detach().to("cpu", torch.float32).clone()
        for k, v in get_peft_model_state_dict(module).items()
    }
    if train.lora.export == "adapter":
        module.save_pretrained(out_dir, state_dict={k: v.to(dtype) for k, v in adapter.items()})
        given = config["base_model"]
        base_uri = (
            adapter_base(local_model_dir(given)) if is_adapter(local_model_dir(given)) else given
        )
        write_base_pointer(out_dir, base_uri, out_uri)
        return
    # merged: the adapter applied to a fresh copy of the base, in float32, then cast
    from peft import get_peft_model

    fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(fresh, peft_config(train))
    set_peft_model_state_dict(peft_model, adapter)
    merged = peft_model.merge_and_unload()
    merged.to(dtype).save_pretrained(out_dir)


def _publish(local_dir: str, out_uri: str) -> None:
    """Move a finished export into place: never a half-written model at ``out_uri``."""
    storage.publish_dir(local_dir, out_uri)
    shutil.rmtree(local_dir, ignore_errors=True)


def train_student(
    answers: pa.Table,
    train: TrainConfig,
    *,
    base_model: str,
    out_uri: str,
    storage_path: str,
    student: StudentConfig,
    name: str = "train",
    placement_strategy: str | None = None,
    show_progress: bool = True,
    crash_at_step: int | None = None,
) -> dict:
    """Fine-tune ``base_model`` on the answers; the model is exported to ``out_uri``.

    A rerun with the same ``storage_path``/``name`` resumes from the latest checkpoint.
    Returns the final metrics plus the count of skipped (failed) rows.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lion_ray.engines.cluster import data_context_quiet
    from lion_ray.errors import LionError
    from lion_ray.progress import StageProgress

    if storage.is_local(storage_path):  # Ray Train needs an absolute path or a URI
        storage_path = storage.resolve(storage_path)[1]
    rows = answers.to_pylist()
    usable = [
        {
            "id": r["id"],
            "instruction": r["instruction"],
            "input": r["input"] or "",
            "answer": r["answer"],
        }
        for r in rows
        if r.get("status", "ok") == "ok" and r["answer"]
    ]
    skipped = len(rows) - len(usable)
    if not usable:
        raise LionError(f"no usable training rows: all {len(rows)} answers failed or are empty")
    use_gpu = train.gpus_per_worker > 0
    resources = {"CPU": train.cpus_per_worker} | ({"GPU": train.gpus_per_worker} if use_gpu else {})
    data_context_quiet()
    progress_uri = _progress_uri(storage_path, name)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": train.model_dump(),
            "base_model": base_model,
            "out_uri": out_uri,
            "student": student.model_dump(),
            "progress_uri": progress_uri,
            "crash_at_step": crash_at_step,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train.workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=placement_strategy or train.placement,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
        ),
        datasets={"train": ray.data.from_items(usable)},
    )
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # surfaced below, in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    with StageProgress(
        "imitation: fine-tuning", total=1, unit="steps", enabled=show_progress
    ) as bar:
        while thread.is_alive():
            thread.join(timeout=1.0)
            if storage.exists(progress_uri):
                try:
                    p = json.loads(storage.read_text(progress_uri))
                except (ValueError, OSError):
                    continue
                bar.set_total(p["total_steps"])
                bar.set_rate(p["target_tokens_per_s"], " tok/s")
                bar.advance(p["step"] - bar.done)
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    if result.error:
        raise result.error
    final = storage.read_json(storage.join(storage_path, name, "final.json"))
    return {**final, "skipped_failed_rows": skipped, "rows": len(usable)}
