"""Imitation fine-tuning: Ray Train + DeepSpeed (gloo) on CPU with two workers."""

import json
import os
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lion_ray.config import StudentConfig
from lion_ray.engines.training import (
    build_sequences,
    cosine_with_warmup,
    deepspeed_config,
    skip_cpu_shm_kernel,
    train_student,
)
from lion_ray.formats import PromptFormat
from lion_ray.logic.examples import IGNORE
from lion_ray.logic.pools import ANSWER_SCHEMA
from lion_ray.logic.prompts import build_prompt
from lion_ray.sandbox.tasks import generate_tasks

from ..conftest import ROOT
from ..helpers import SLOW_CHECKPOINTS, registered_checkpoints, tiny_train, until

COMPACT = StudentConfig(prompt_format="compact")  # the tiny students' text template


def _answers(n=48, failed=0, seed=0):
    rows = []
    for i, t in enumerate(generate_tasks(n + failed, seed=seed, max_difficulty=1)):
        bad = i < failed
        rows.append(
            {
                "id": f"{i:04d}",
                "instruction": t.instruction,
                "input": "",
                "answer": "" if bad else t.answer,
                "status": "failed" if bad else "ok",
                "error": "500" if bad else "",
                "finish_reason": "stop",
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "cost_usd": 0.0,
                "cached": False,
            }
        )
    return pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA)


def _cfg(**kw):
    return tiny_train(**({"checkpoint_every_steps": 3, "warmup_ratio": 0.1} | kw))


def test_deepspeed_config_follows_train_config():
    cfg = deepspeed_config(
        _cfg(zero_stage=3, offload_optimizer=True, offload_params=True, effective_batch_size=16),
        use_gpu=False,
    )
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["bf16"]["enabled"] is False and cfg["gradient_clipping"] == 1.0
    # bf16 where the workers have GPUs, or where asked for (the GPU path's precision on CPU)
    assert deepspeed_config(_cfg(gpus_per_worker=1), use_gpu=True)["bf16"]["enabled"] is True
    assert deepspeed_config(_cfg(precision="bf16"), use_gpu=False)["bf16"]["enabled"] is True
    # and a user's DeepSpeed keys are merged over lion-ray's, nested keys one by one
    merged = deepspeed_config(
        _cfg(deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}}), False
    )
    assert merged["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert merged["zero_optimization"]["stage"] == 2


def test_a_cpu_worker_does_not_compile_deepspeeds_shared_memory_kernel():
    # the kernel is a minute of C++ per fresh node, for an all-reduce that training never uses
    import deepspeed
    from deepspeed.comm.torch import build_shm_op

    saved = dict(deepspeed.ops.__compatible_ops__)
    try:
        skip_cpu_shm_kernel(deepspeed)
        assert build_shm_op() is None
    finally:
        deepspeed.ops.__compatible_ops__.update(saved)


def test_cosine_schedule_with_warmup():
    f = cosine_with_warmup(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-9)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_loss_covers_only_response_tokens(tiny_student):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    rows = [{"instruction": "Reverse 'kato'.", "input": "", "answer": "otak"}]
    seqs, stats = build_sequences(rows, PromptFormat(tok, "compact"), 96, packing=False)
    prompt_ids = tok(
        build_prompt("Reverse 'kato'.", "", "compact"), add_special_tokens=False
    ).input_ids
    seq = seqs[0]
    assert seq.labels[: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert seq.labels[len(prompt_ids) :] == tok("otak", add_special_tokens=False).input_ids + [
        tok.eos_token_id
    ]
    assert stats["target_tokens"] == 5
    # the model's loss is exactly cross-entropy over those target positions, prompt excluded
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    ids, labels = torch.tensor([seq.input_ids]), torch.tensor([seq.labels])
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        logits = out.logits[0, :-1]
        targets = labels[0, 1:]
        keep = targets != IGNORE
        manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_packing_keeps_attention_inside_examples(tiny_student):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    rows = [
        {"instruction": t.instruction, "input": "", "answer": t.answer}
        for t in generate_tasks(6, seed=1)
    ]
    packed, _ = build_sequences(rows, PromptFormat(tok, "compact"), 200, packing=True)
    single, _ = build_sequences(rows, PromptFormat(tok, "compact"), 200, packing=False)
    assert len(packed) < len(single)
    model = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    model.config.use_cache = False
    with torch.no_grad():
        p = packed[0]
        packed_loss = model(
            input_ids=torch.tensor([p.input_ids]),
            labels=torch.tensor([p.labels]),
            position_ids=torch.tensor([p.position_ids]),
        ).logits
        start, logits = 0, []
        for s in single:
            if start >= len(p):
                break
            logits.append(model(input_ids=torch.tensor([s.input_ids])).logits[0])
            start += len(s)
    alone = torch.cat(logits)[: len(p)]
    assert torch.allclose(packed_loss[0], alone, atol=1e-4)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _assert_trained_and_exported(metrics, model_dir, base_dir, stage: int, steps: int) -> None:
    """48 usable rows of 51 (3 failed), a falling loss, every step, and an exported model
    whose every tensor moved; ZeRO-3 ranks loaded only their partition."""
    assert (
        metrics["skipped_failed_rows"] == 3 and metrics["rows"] == 48 and metrics["examples"] == 48
    )
    assert metrics["loss_last"] < metrics["loss_first"]
    assert metrics["step"] == metrics["total_steps"] == steps
    assert len(set(metrics["worker_nodes"])) == 1 and len(metrics["worker_nodes"]) == 2
    model, tok = _load(model_dir)
    base, _ = _load(base_dir)
    assert (model_dir / "model.safetensors").exists() and tok.eos_token == "</s>"
    changed = [
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), base.state_dict().values(), strict=True)
    ]
    assert all(changed)  # ZeRO-3 gathered every partition before exporting
    if stage == 3:  # each rank loaded only its partition (zero.Init), never the whole model
        assert metrics["loaded_parameters_per_rank"] <= metrics["parameters"] // 2 + 1024
    else:
        assert metrics["loaded_parameters_per_rank"] == metrics["parameters"]


@pytest.mark.slow
def test_two_workers_train_and_export_with_zero3(ray_local, tiny_student, tmp_path):
    """3 epochs x 6 micro-batches per worker with 4 micro-batches per step: the last step is
    a partial window of 2, which DeepSpeed would not apply on its own (its boundary is every
    4th micro-step): 5 steps, not 4. (ZeRO-2, one micro-batch per step: the worker-failure
    test.)"""
    # every parameter partitioned, however small (DeepSpeed keeps those under 1e5 elements
    # whole by default, which would hide a load that is not partitioned)
    partition_all = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    metrics = train_student(
        _answers(48, failed=3),
        _cfg(zero_stage=3, epochs=3, effective_batch_size=32, deepspeed=partition_all),
        base_model=str(tiny_student),
        out_uri=str(tmp_path / "model"),
        storage_path=str(tmp_path / "ckpt"),
        student=COMPACT,
        show_progress=False,
    )
    _assert_trained_and_exported(metrics, tmp_path / "model", tiny_student, stage=3, steps=5)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_resuming_rank_fetches_only_its_own_shards(stage):
    from lion_ray.engines.training import rank_checkpoint_files
    from lion_ray.errors import LionError

    prefix = "bf16_" if stage == 3 else ""
    names = ["ds/mp_rank_00_model_states.pt"] if stage == 2 else []
    for r in range(12):
        names.append(f"ds/{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        if stage == 3:
            names.append(f"ds/zero_pp_rank_{r}_mp_rank_00_model_states.pt")
    names += ["latest", "zero_to_fp32.py", "ds/mp_rank_00_model_states.pt.tmp"]
    picked = rank_checkpoint_files(names, 1, stage)
    if stage == 2:
        assert picked == [
            "ds/mp_rank_00_model_states.pt",
            "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
    else:  # rank 1, not rank 10 or 11
        assert picked == [
            "ds/zero_pp_rank_1_mp_rank_00_model_states.pt",
            "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
    with pytest.raises(LionError, match="has no (module states|optimizer shard) for rank 12"):
        rank_checkpoint_files(names, 12, stage)


@pytest.mark.slow
def test_worker_failure_resumes_from_checkpoint(ray_local, tiny_student, tmp_path):
    """ZeRO-2, 3 epochs x 6 micro-batches per worker, one per step: 18 steps; a worker dies at
    step 10, the run resumes from a checkpoint and exports a model as an uninterrupted run
    does."""
    metrics = train_student(
        _answers(48, failed=3),
        _cfg(zero_stage=2, epochs=3, effective_batch_size=8, checkpoint_every_steps=4),
        base_model=str(tiny_student),
        out_uri=str(tmp_path / "model"),
        storage_path=str(tmp_path / "ckpt"),
        student=COMPACT,
        show_progress=False,
        crash_at_step=10,
    )
    # a checkpoint from before the crash at step 10 (Train V2 registers a checkpoint when its
    # controller next polls the workers, so the newest one may not have been registered yet)
    assert metrics["resumed_from_step"] in (4, 8)
    _assert_trained_and_exported(metrics, tmp_path / "model", tiny_student, stage=2, steps=18)


@pytest.mark.slow
def test_rerun_after_driver_crash_resumes(tiny_student, shared_cluster, tmp_path):
    data = tmp_path / "answers.parquet"
    pq.write_table(_answers(64), data)
    cmd = [
        sys.executable,
        "-m",
        "lion_ray",
        "train",
        "--data",
        str(data),
        "--model",
        str(tiny_student),
        "--out",
        str(tmp_path / "model"),
        "--config",
        "configs/demo.yaml",
        "--set",
        "train.epochs=6",
        "--set",
        "train.micro_batch_size=4",
        "--set",
        "train.effective_batch_size=8",
        "--set",
        "train.checkpoint_every_steps=5",
        "--set",
        "train.max_length=96",
        "--set",
        "student.tiny.max_position_embeddings=256",
    ]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [*cmd, *SLOW_CHECKPOINTS],  # killed mid-way
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    store = tmp_path / "model.checkpoints" / "train"
    # a loaded machine can take minutes to start Ray and DeepSpeed: wait on the checkpoint
    until(lambda: registered_checkpoints(store) > 0, "a registered checkpoint", 600, 0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert registered_checkpoints(store) and not (tmp_path / "model").exists()
    # the kill needed a Ray of its own; the rerun goes to the worker's running one
    on_shared = [*cmd, "--set", f"cluster.address={shared_cluster.address}"]
    rerun = subprocess.run(
        on_shared, cwd=ROOT, env=shared_cluster.env, capture_output=True, text=True, timeout=400
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    final = json.loads((store / "final.json").read_text())
    assert final["resumed_from_step"] and final["resumed_from_step"] % 5 == 0
    assert final["step"] == final["total_steps"] == 48
    _load(tmp_path / "model")


@pytest.mark.slow
def test_multinode_placement_and_node_loss(tiny_student, tmp_path):
    data = tmp_path / "answers.parquet"
    pq.write_table(_answers(48), data)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.engines.multinode_train",
            str(tiny_student),
            str(data),
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=800,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, res.stderr[-3000:]
    out = json.loads(line[len("RESULT ") :])
    assert out["checkpoint_seen_before_loss"] and out["finished"] and out["exported"]
    assert out["resumed_from_step"] and out["final_step"] == out["total_steps"]
    final_nodes = out["node_loss_worker_nodes"]
    assert len(set(final_nodes)) == 2  # STRICT_SPREAD: the two workers on different nodes
    assert out["node_ids"][0] not in final_nodes  # the lost node is gone from the final run
    assert out["node_ids"][1] in final_nodes  # the survivor and the replacement, not the head


def test_each_rank_gets_only_its_shard_of_the_usable_rows():
    """Rank r trains on the usable rows sorted by id, r, r + world, ...: the driver deals
    them out in Arrow and each worker fetches its own shard, never the whole Train Pool."""
    from lion_ray.engines.training import rank_shards

    table = _answers(40, failed=5)  # 45 rows, 5 of them failed
    read = []

    def windows():  # the answers file, 7 rows at a time
        read.append(1)
        return (table.slice(i, 7) for i in range(0, table.num_rows, 7))

    pieces: dict[int, list] = {0: [], 1: [], 2: []}
    for rank, piece in rank_shards(windows, 3):
        assert piece.num_rows <= 7
        pieces[rank].append(piece)
    shards = [pa.concat_tables(pieces[r]).sort_by("id") for r in range(3)]
    assert len(read) == 2  # the ids, then the rows: never the whole table at once
    usable = sorted(
        (r for r in table.to_pylist() if r["status"] == "ok" and r["answer"]),
        key=lambda r: r["id"],
    )
    assert [s.num_rows for s in shards] == [14, 13, 13] and len(usable) == 40
    for rank, shard in enumerate(shards):
        assert shard.column_names == ["id", "instruction", "input", "answer"]
        assert shard.column("id").to_pylist() == [r["id"] for r in usable[rank::3]]


def test_a_rank_with_no_rows_trains_on_none_instead_of_failing():
    """Fewer usable rows than ranks (a round whose teacher answers mostly failed): the
    rank left without a piece gets an empty shard, not Arrow's error on no tables."""
    from lion_ray.engines.training import rank_shards, shard_rows

    table = _answers(1, failed=3)
    usable = sorted(r["id"] for r in table.to_pylist() if r["status"] == "ok" and r["answer"])
    pieces: dict[int, list] = {0: [], 1: []}
    for rank, piece in rank_shards(lambda: [table], 2):
        pieces[rank].append(piece)
    assert [r["id"] for r in shard_rows(pieces[0])] == usable and len(usable) == 1
    assert shard_rows(pieces[1]) == []
