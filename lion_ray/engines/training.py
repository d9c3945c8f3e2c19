"""Imitation fine-tuning: Ray Train's TorchTrainer with DeepSpeed ZeRO inside the loop.

    metrics = train_student(answers, cfg.train, base_model=..., out_uri=..., storage_path=...)

* ZeRO-2 or ZeRO-3 (optionally offloading optimizer state and parameters), bf16 on GPU and
  fp32 on CPU (gloo), gradient accumulation, cosine schedule with warmup, clipping.
* Data: the answers table through the object store, once (rows whose teacher answer
  failed are skipped and counted), encoded with the training template and loss masking,
  optionally packed. Rows are re-ordered by id across workers so the data order, and so a
  resumed run, does not depend on how the work was scheduled.
* Checkpoints every N optimizer steps through ``ray.train.report``; ``FailureConfig``
  restores workers from the latest one, and a rerun with the same storage path and name
  (after a driver crash) restores too. The final model is exported in Hugging Face format.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa

from lion_ray import storage
from lion_ray.config import StudentConfig, TrainConfig
from lion_ray.errors import LionError
from lion_ray.logic.examples import EpochOrder, Sequence, pack, pad_batch, unpacked


def deepspeed_config(train: TrainConfig, use_gpu: bool) -> dict:
    """lion-ray's DeepSpeed config for ``train``, with ``train.deepspeed`` merged over it."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage == 3:  # DeepSpeed's default changed within 0.19 (1e12, then 1e9)
        zero["sub_group_size"] = int(1e9)
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.bf16},
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
    return _merged(config, train.deepspeed)


CPU_SHM_KERNEL = "deepspeed_shm_comm"


def skip_cpu_shm_kernel(deepspeed) -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce kernel on a CPU worker.

    DeepSpeed's TorchBackend builds it on every start (about 55 s of C++ on 2 cores) and only
    its inference all-reduce uses it: ZeRO's collectives are torch.distributed's either way.
    The build is cached per machine, but it is redone on every fresh node (a KubeRay pod),
    and again whenever a process finds another ninja on its PATH (the pip wheel's 1.13
    and a system 1.11 each rewrite the build log the other reads). DeepSpeed keeps its op
    table as one module dict that it reads at the build (``deepspeed.ops``: "edits to it
    persist"): marking the kernel unavailable makes the backend fall back to gloo's.
    """
    deepspeed.ops.__compatible_ops__[CPU_SHM_KERNEL] = False


def _merged(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


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


def _load_for_training(config: dict, train: TrainConfig, ds_config: dict):
    """(model, tokenizer, full base dir, export dtype): the base in the compute dtype,
    wrapped in a LoRA adapter when asked (the previous round's, trainable, when it exported
    one), gradient checkpointing on if asked. Under ZeRO-3 the model is built inside
    DeepSpeed's ``zero.Init``: each rank holds only its partition from the start, and
    rank 0 alone reads the checkpoint (transformers then scatters it module by module)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

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
    kwargs = {"dtype": torch.bfloat16 if train.bf16 else torch.float32}
    if student.attn_implementation:
        kwargs["attn_implementation"] = student.attn_implementation
    # transformers holds this config by weak reference: it partitions while it lives
    zero3 = HfDeepSpeedConfig(ds_config) if train.zero_stage == 3 else None
    try:
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
    finally:
        # later loads (the merged export on rank 0 alone) must not be collective
        del zero3
        unset_hf_deepspeed_config()
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
    entered = time.monotonic()
    # seconds per set-up phase (rank 0's reach final.json): where a round's start-up goes;
    # a phase that ends in a collective includes the wait for the slowest rank
    setup: dict[str, float] = {}
    mark = [entered]

    def phase(name: str) -> None:
        now = time.monotonic()
        setup[name] = round(now - mark[0], 2)
        mark[0] = now

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
    from lion_ray.models import copy_tokenizer, local_model_dir

    phase("imports")
    train = TrainConfig.model_validate(config["train"])
    student = StudentConfig.model_validate(config["student"])
    use_gpu = train.gpus_per_worker > 0
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # One device for everything: Ray Train's for this worker. NCCL only moves CUDA tensors,
    # so every tensor that enters a collective is made on it, and object collectives
    # (all_gather_object) need it as the current CUDA device.
    device = torch.device("cpu")
    if use_gpu:
        index = training_device(
            ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES", ""), ctx.get_local_rank()
        )
        device = torch.device("cuda", index)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        skip_cpu_shm_kernel(deepspeed)
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")  # reuses Ray's group
    torch.manual_seed(train.seed)
    phase("distributed")

    # Data: this rank's shard only, from the object store (the driver split the rows by id,
    # so the data order, and a resumed run, do not depend on how anything was scheduled)
    rows = shard_rows(ray.get(config["rows"][rank]))
    phase("rows")

    ds_config = deepspeed_config(train, use_gpu)
    model, tokenizer, base_dir, export_dtype = _load_for_training(config, train, ds_config)
    phase("model")
    held = torch.tensor([_held_numel(model)], dtype=torch.long, device=device)
    dist.all_reduce(held, op=dist.ReduceOp.MAX)  # the most parameters one rank loaded
    fmt = PromptFormat(tokenizer, student.prompt_format, student.system_prompt)
    seqs, data_stats = build_sequences(rows, fmt, train.max_length, train.packing)
    most_seqs = torch.tensor([len(seqs)], dtype=torch.long, device=device)
    dist.all_reduce(most_seqs, op=dist.ReduceOp.MAX)
    totals = torch.tensor(
        [data_stats[k] for k in ("examples", "target_tokens", "truncated", "sequences")],
        dtype=torch.long,
        device=device,
    )
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    # every worker runs the same number of micro-batches (ZeRO collectives must line up);
    # a worker with fewer sequences cycles through its own again
    batches_per_epoch = max(1, math.ceil(int(most_seqs) / train.micro_batch_size))
    total_micro = batches_per_epoch * train.epochs
    total_steps = max(1, math.ceil(total_micro / train.grad_accum_steps))
    warmup = math.ceil(train.warmup_ratio * total_steps)

    phase("sequences")
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, cosine_with_warmup(total_steps, warmup)
        ),
    )
    assert engine.device == device, (engine.device, device)  # DeepSpeed agrees with Ray Train
    phase("deepspeed")

    start_micro, resumed_from = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with _checkpoint_for_rank(checkpoint, rank, train.zero_stage) as ckpt_dir:
            # a LoRA checkpoint holds the adapter only; the frozen base comes from base_dir
            _, client = engine.load_checkpoint(
                ckpt_dir, tag="ds", load_module_strict=train.lora is None
            )
        start_micro = client["micro_step"]
        resumed_from = engine.global_steps  # restored by DeepSpeed with the optimizer state
        phase("resume")

    epoch_order = EpochOrder(len(seqs), train.seed)

    def batch_at(micro: int) -> tuple[dict, int]:
        """The micro-batch at ``micro`` and its count of real (non-padding) tokens."""
        epoch, k = divmod(micro, batches_per_epoch)
        order = epoch_order(epoch)
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

    losses: list = []  # this optimizer step's micro-batch losses, detached, on the device
    first_loss = mean_loss = None
    tokens_done = real_tokens = 0
    started = time.monotonic()
    last_progress = 0.0
    # fault injection for tests and failure drills: one worker dies once at this step
    crash_at, crash_marker = config.get("crash_at_step"), config["progress_uri"] + ".crashed"
    engine.train()
    for micro in range(start_micro, total_micro):
        batch, real = batch_at(micro)
        if micro + 1 == total_micro and total_micro % train.grad_accum_steps:
            # the last, partial window: DeepSpeed steps the optimizer only every
            # grad_accum_steps micro-steps, so its gradients would never be applied
            engine.set_gradient_accumulation_boundary(True)
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        tokens_done += int((batch["labels"] != -100).sum())
        real_tokens += real
        losses.append(loss.detach())
        boundary = (micro + 1) % train.grad_accum_steps == 0 or micro + 1 == total_micro
        if not boundary:
            continue
        step = engine.global_steps
        mean = (torch.stack(losses).float().mean() / world).reshape(1)
        dist.all_reduce(mean)
        mean_loss = mean.item()
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
    exporting = time.monotonic()

    # Export in Hugging Face format, in the base checkpoint's dtype. Under ZeRO-3 a full
    # model is gathered module by module onto rank 0's CPU (no rank ever holds it all on
    # the device); an adapter's few parameters are gathered at once.
    out_uri = config["out_uri"]
    export_tmp = tempfile.mkdtemp(prefix="lion-export-") if rank == 0 else None
    if train.zero_stage == 3 and train.lora is None:
        state = engine._zero3_consolidated_16bit_state_dict()  # a collective: every rank calls
        if rank == 0:
            export(engine.module, export_tmp, train, base_dir, export_dtype, config, out_uri, state)
        del state
    elif train.zero_stage == 3:
        adapter_params = [p for p in engine.module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(adapter_params, modifier_rank=None):
            if rank == 0:
                export(engine.module, export_tmp, train, base_dir, export_dtype, config, out_uri)
    elif rank == 0:
        export(engine.module, export_tmp, train, base_dir, export_dtype, config, out_uri)
    export_s = time.monotonic() - exporting
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
        "setup_s": round(started - entered, 2),  # imports, data, model, DeepSpeed, resume
        "setup_phases_s": setup,
        "worker_started_at": time.time() - (time.monotonic() - entered),
        "export_s": round(export_s, 2),
        "resumed_from_step": resumed_from,
        "exported": out_uri,
        "export_dtype": str(export_dtype).removeprefix("torch."),
        "parameters": sum(
            p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()
        ),
        "trainable_parameters": sum(
            p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable
        ),
        "loaded_parameters_per_rank": int(held),  # < parameters: ZeRO-3 partitioned the load
    }
    import resource

    peak = torch.tensor(  # MB
        [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], device=device
    )
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    final["peak_rss_mb"] = round(float(peak), 1)  # the largest worker's peak resident memory
    nodes: list[str] = [""] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    final["worker_nodes"] = nodes
    if rank == 0:
        # the tokenizer as the base has it, byte for byte: saved again, its files would
        # differ (transformers rewrites them) and the next round could not move in place
        if not copy_tokenizer(local_model_dir(config["base_model"]), export_tmp):
            tokenizer.save_pretrained(export_tmp)
        storage.write_checksums(export_tmp)  # last: its presence says the export is complete
        _publish(export_tmp, out_uri)
        # Ray Train keeps the metrics of checkpointed reports; the final ones go beside them
        storage.write_json(config["progress_uri"].replace("progress.json", "final.json"), final)
    dist.barrier()
    if rank == 0:
        storage.write_json(
            config["progress_uri"].replace("progress.json", "final.json"),
            final | {"worker_finished_at": time.time()},
        )
    ray.train.report(final)


def _held_numel(model) -> int:
    """Parameters this rank holds (its ZeRO-3 partition, or all of them)."""
    return sum(
        p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters()
    )


def _state_in_dtype(state_dict: dict, dtype) -> dict:
    """A state dict on CPU in ``dtype``; tensors that share storage (tied embeddings)
    still share it, so save_pretrained writes them once, as the base has them."""
    import torch

    cast: dict[int, torch.Tensor] = {}
    state = {}
    for name, tensor in state_dict.items():
        key = tensor.data_ptr()
        if key not in cast:
            cast[key] = tensor.detach().to("cpu", dtype).clone()
        state[name] = cast[key]
    return state


def _stamp_dtype(model_dir: str, dtype) -> None:
    """Make config.json name the dtype the exported weights are stored in."""
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)  # the old name; transformers 5 reads "dtype"
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def export(
    module, out_dir: str, train: TrainConfig, base_dir: str, dtype, config, out_uri, state=None
):
    """Write the trained student: a full model (from ``state``, a gathered ZeRO-3 state dict,
    or the module's own), an adapter beside a pointer to its base, or the base with the
    adapter merged in. Always in the base checkpoint's dtype."""
    if train.lora is None:
        state = module.state_dict() if state is None else state
        module.save_pretrained(out_dir, state_dict=_state_in_dtype(state, dtype))
        # save_pretrained writes the dtype the module computes in (fp32 on CPU), not the one
        # the weights above are stored in; loaders with dtype="auto" (and vLLM) read this
        _stamp_dtype(out_dir, dtype)
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
    _stamp_dtype(out_dir, dtype)


def rank_checkpoint_files(names: list[str], rank: int, zero_stage: int) -> list[str]:
    """The files of a DeepSpeed checkpoint (saved with tag "ds") that ``rank`` reads to
    resume: ZeRO-2, rank 0's module states and this rank's optimizer shard; ZeRO-3, this
    rank's module and optimizer shards (DeepSpeed 0.19 opens no other rank's files)."""
    import re

    own = rf"(bf16_)?zero_pp_rank_{rank}_mp_rank_\d+_optim_states\.pt"
    module = (
        r"mp_rank_\d+_model_states\.pt"
        if zero_stage == 2
        else rf"zero_pp_rank_{rank}_mp_rank_\d+_model_states\.pt"
    )
    picked = {
        kind: [n for n in names if re.fullmatch(rf"ds/{pattern}", n)]
        for kind, pattern in (("module states", module), ("optimizer shard", own))
    }
    for kind, found in picked.items():
        if not found:
            raise LionError(
                f"the ZeRO-{zero_stage} checkpoint has no {kind} for rank {rank} (files: "
                f"{sorted(names)[:8]}); was it written with another stage or world size?"
            )
    return picked["module states"] + picked["optimizer shard"]


@contextmanager
def _checkpoint_for_rank(checkpoint, rank: int, zero_stage: int):
    """A local directory holding what this rank needs of a Ray Train checkpoint: the
    checkpoint itself when it is on local storage, else only this rank's files (a resume
    from an object store does not copy every rank's shards to every worker)."""
    import pyarrow.fs as pafs

    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    if isinstance(fs, pafs.LocalFileSystem):
        yield root
        return
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    names = [i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File]
    local = tempfile.mkdtemp(prefix=f"lion-resume-{rank}-")
    try:
        for name in rank_checkpoint_files(names, rank, zero_stage):
            os.makedirs(os.path.dirname(os.path.join(local, name)), exist_ok=True)
            with (
                fs.open_input_stream(f"{root}/{name}") as src,
                open(os.path.join(local, name), "wb") as dst,
            ):
                shutil.copyfileobj(src, dst, length=16 << 20)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _publish(local_dir: str, out_uri: str) -> None:
    """Move a finished export into place: never a half-written model at ``out_uri``."""
    storage.publish_dir(local_dir, out_uri)
    shutil.rmtree(local_dir, ignore_errors=True)


def training_device(gpu_ids: list, visible: str, local_rank: int) -> int:
    """The CUDA device of a Ray Train worker: its GPU's place among the devices Ray Train
    made visible on its node (``ray.train.torch.get_device``'s rule), which must also be the
    one DeepSpeed takes (cuda:LOCAL_RANK, in its engine and in ZeRO-3's partitioning). They
    agree when every worker has a GPU of its own; two workers packed onto one GPU (or a
    worker with two) would train on the wrong device or fail NCCL's duplicate-GPU check, so
    this refuses them with the reason."""
    shown = [v.strip() for v in visible.split(",") if v.strip()]
    own = sorted(str(int(float(g))) for g in gpu_ids)
    if len(own) != 1 or own[0] not in shown:
        raise LionError(
            f"a training worker got GPU(s) {own} with CUDA_VISIBLE_DEVICES={visible!r}: each "
            "worker drives exactly one GPU of its own (train.gpus_per_worker: 1)"
        )
    index = shown.index(own[0])
    if index != local_rank:
        raise LionError(
            f"training worker {local_rank} on this node got GPU {own[0]}, device {index} of "
            f"{shown}: two workers share a GPU (DeepSpeed would take device {local_rank}). "
            "Each worker needs a GPU of its own: with student.colocate, one beside each "
            "engine (train.workers equal to student.num_engines)"
        )
    return index


def workers_request(
    train: TrainConfig, placement_strategy: str | None = None, colocated: bool = False
):
    """The Ray Train worker group imitation asks for (checked before Ray is asked).
    ``colocated``: each worker shares its GPU with a sleeping student engine, which holds
    just over half of it, so a worker asks for the rest and fits nowhere but beside an
    engine. Without an engine up (round 1 of a colocated run) each worker asks a whole GPU:
    two workers asking 0.49 each would be packed onto one GPU."""
    from lion_ray.engines.student.engine import COLOCATED_WORKER_GPU
    from lion_ray.logic.resources import Request

    per_worker = COLOCATED_WORKER_GPU if colocated else float(train.gpus_per_worker)
    gpus = {"GPU": per_worker} if train.gpus_per_worker else {}
    return Request(
        "imitation.train: Ray Train workers",
        {"CPU": train.cpus_per_worker} | gpus,
        train.workers,
        placement_strategy or train.placement,
        fix="Lower train.workers, train.cpus_per_worker or train.gpus_per_worker, or add nodes.",
    )


def _usable(answers: pa.Table) -> pa.Table:
    """The rows training can use (answered, not empty) as (id, instruction, input, answer)."""
    import pyarrow.compute as pc

    table = answers
    if "status" in table.column_names:
        table = table.filter(pc.equal(table["status"], "ok"))
    table = table.filter(pc.greater(pc.utf8_length(pc.fill_null(table["answer"], "")), 0))
    table = table.select(["id", "instruction", "input", "answer"])
    return table.set_column(2, "input", pc.fill_null(table["input"], ""))


def rank_shards(
    windows: Callable[[], Iterable[pa.Table]], world: int
) -> Iterator[tuple[int, pa.Table]]:
    """The usable rows, sorted by id and dealt to ``world`` ranks in turn (rank r trains on
    rows r, r + world, ...), as (rank, piece) pieces: a rank's shard is its pieces, sorted
    by id. ``windows()`` gives the answers a window at a time and is read twice (the ids,
    then the rows), so only the ids of the whole Train Pool are ever held at once."""
    import numpy as np
    import pyarrow.compute as pc

    ids = pa.chunked_array([_usable(w).column("id") for w in windows()], type=pa.string())
    rank_of = np.empty(len(ids), dtype=np.int32)
    # the n-th id in sorted order (a stable sort: equal ids keep their order) goes to n % world
    rank_of[pc.sort_indices(ids).to_numpy()] = np.arange(len(ids)) % world
    offset = 0
    for window in windows():
        usable = _usable(window)
        ranks = rank_of[offset : offset + usable.num_rows]
        offset += usable.num_rows
        for rank in range(world):
            piece = usable.filter(pa.array(ranks == rank))
            if piece.num_rows:
                yield rank, piece


def shard_rows(pieces: list[pa.Table]) -> list[dict]:
    """A rank's rows from its ``rank_shards`` pieces, sorted by id; none when there are
    fewer usable rows than ranks (the rank then cycles through nothing, as before)."""
    return pa.concat_tables(pieces).sort_by("id").to_pylist() if pieces else []


def scaling_config(train: TrainConfig, request):
    """Ray Train's worker group for a ``workers_request``: its bundles and placement."""
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=train.workers,
        use_gpu=train.gpus_per_worker > 0,
        resources_per_worker=request.bundle,
        placement_strategy=request.strategy,
    )


def _as_table(window: pa.Table | pa.RecordBatch) -> pa.Table:
    return window if isinstance(window, pa.Table) else pa.Table.from_batches([window])


def train_student(
    answers: pa.Table | str,
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
    beside_engine: bool = False,
    held: dict | None = None,
    window_rows: int = 10_000,
) -> dict:
    """Fine-tune ``base_model`` on the answers (a table, or a Parquet file's URI, which is
    read ``window_rows`` rows at a time); the model is exported to ``out_uri``.
    ``beside_engine``: a colocated student engine sleeps on the GPUs (each worker asks for
    the rest of one); ``held``: what the run's engines hold, for the preflight.

    A rerun with the same ``storage_path``/``name`` resumes from the latest checkpoint.
    Returns the final metrics plus the count of skipped (failed) rows.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lion_ray.engines.cluster import data_context_quiet, preflight
    from lion_ray.errors import LionError
    from lion_ray.progress import StageProgress

    if storage.is_local(storage_path):  # Ray Train needs an absolute path or a URI
        storage_path = storage.resolve(storage_path)[1]

    def windows() -> Iterable[pa.Table]:
        if isinstance(answers, pa.Table):
            return answers.to_batches(max_chunksize=window_rows)
        return storage.iter_windows(answers, window_rows)

    # each rank's rows go to the object store a piece at a time; a worker fetches its own
    shards: list[list] = [[] for _ in range(train.workers)]
    usable = 0
    for rank, piece in rank_shards(lambda: map(_as_table, windows()), train.workers):
        shards[rank].append(ray.put(piece))
        usable += piece.num_rows
    total = answers.num_rows if isinstance(answers, pa.Table) else storage.count_rows(answers)
    skipped = total - usable
    if not usable:
        raise LionError(f"no usable training rows: all {total} answers failed or are empty")
    use_gpu = train.gpus_per_worker > 0
    request = workers_request(train, placement_strategy, student.colocate and beside_engine)
    preflight(request, held)  # Ray Train would retry a worker group that can never start
    data_context_quiet()
    progress_uri = _progress_uri(storage_path, name)
    # read by TorchTrainer.fit(), which hands it to the controller actor it starts
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(train.poll_interval_s)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": train.model_dump(),
            "base_model": base_model,
            "out_uri": out_uri,
            "student": student.model_dump(),
            "progress_uri": progress_uri,
            "crash_at_step": crash_at_step,
            # a Ray Data shard per worker would cost a pipeline per round; each rank gets
            # its own rows from the object store, and no worker holds the whole pool
            "rows": shards,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=scaling_config(train, request),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(
                max_failures=train.max_failures,
                # each worker-group start waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s)
                # and Ray retries it without end by default
                controller_failure_limit=max(0, math.ceil(train.start_timeout_s / 60) - 1),
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
        ),
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
    return {**final, "skipped_failed_rows": skipped, "rows": usable}
