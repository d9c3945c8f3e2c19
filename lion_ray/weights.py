"""Delta weights: release a fine-tuned student as a diff against its base model.

    lion-ray weights diff --base llama-7b --tuned runs/x/round_3/imitation/model --out lion-7b-delta
    lion-ray weights recover --base llama-7b --diff lion-7b-delta --out lion-7b

The delta is the bitwise XOR of each tuned tensor with the base tensor (float subtraction
is not reversible bit for bit; XOR is), so ``recover`` rebuilds the tuned weights exactly.
Rows a tuned embedding gained (an added pad token grows the vocabulary) are stored as they
are. The diff records sha256 checksums of both models: a mismatched base is refused before
anything is written, and the recovered weights are checked against the tuned checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from lion_ray import storage
from lion_ray.errors import LionError

FORMAT = "lion-ray-xor-delta-v1"
ADDED = ".__added_rows__"
DELTA_FILE = "delta.safetensors"
MAX_SHARD_BYTES = 5 * 1024**3


def _torch():
    import torch

    return torch


def load_tensors(model_dir: str | Path) -> dict:
    """Every tensor of a Hugging Face model directory (one or several safetensors files)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise LionError(f"{model_dir}: no .safetensors weights found")
    tensors: dict = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def checksum(tensors: dict) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in name order."""
    torch = _torch()
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _bits(t):
    """The tensor's bit pattern as an integer tensor of the same width."""
    torch = _torch()
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width)


def _from_bits(bits, dtype):
    return bits.view(dtype)


def _copy_side_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if (
            f.is_file()
            and not f.name.endswith(".safetensors")
            and f.name not in ("model.safetensors.index.json", storage.CHECKSUMS)
        ):
            shutil.copy2(f, dst / f.name)


def _publish(tmp: Path, out_dir: str) -> None:
    dest = Path(out_dir)
    staging = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(tmp, staging)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(staging, dest)


def diff(base_dir: str, tuned_dir: str, out_dir: str) -> dict:
    """Write the XOR delta of ``tuned_dir`` against ``base_dir`` to ``out_dir``."""
    from safetensors.torch import save_file

    torch = _torch()
    base, tuned = load_tensors(base_dir), load_tensors(tuned_dir)
    only_base, only_tuned = sorted(set(base) - set(tuned)), sorted(set(tuned) - set(base))
    if only_base or only_tuned:
        raise LionError(
            f"the models have different tensors (base only: {only_base[:3]}, tuned only: "
            f"{only_tuned[:3]}); a delta needs the same architecture"
        )
    delta, added = {}, 0
    for name, t in tuned.items():
        b = base[name]
        if t.dtype != b.dtype:
            raise LionError(
                f"{name}: dtype {t.dtype} in the tuned model, {b.dtype} in the base; save both in one dtype"
            )
        if t.shape == b.shape:
            delta[name] = torch.bitwise_xor(_bits(t), _bits(b))
        elif t.dim() >= 1 and t.shape[1:] == b.shape[1:] and t.shape[0] > b.shape[0]:
            n = b.shape[0]  # rows appended to an embedding (e.g. an added pad token)
            delta[name] = torch.bitwise_xor(_bits(t[:n]), _bits(b))
            delta[name + ADDED] = t[n:].contiguous()
            added += t.shape[0] - n
        else:
            raise LionError(
                f"{name}: shape {tuple(t.shape)} in the tuned model vs {tuple(b.shape)} in the base"
            )
    meta = {
        "format": FORMAT,
        "base_sha256": checksum(base),
        "tuned_sha256": checksum(tuned),
        "dtypes": json.dumps({k: str(v.dtype).removeprefix("torch.") for k, v in tuned.items()}),
    }
    with tempfile.TemporaryDirectory(prefix="lion-delta-") as tmp:
        save_file(delta, str(Path(tmp) / DELTA_FILE), metadata=meta)
        _copy_side_files(Path(tuned_dir), Path(tmp))
        _publish(Path(tmp), out_dir)
    return {
        "tensors": len(tuned),
        "added_rows": added,
        "base_sha256": meta["base_sha256"],
        "tuned_sha256": meta["tuned_sha256"],
    }


def _save_sharded(tensors: dict, out: Path) -> None:
    """Hugging Face layout: one model.safetensors, or shards plus an index past 5 GB."""
    from safetensors.torch import save_file

    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= MAX_SHARD_BYTES:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def recover(base_dir: str, diff_dir: str, out_dir: str) -> dict:
    """Rebuild the tuned model from ``base_dir`` and the delta in ``diff_dir``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch = _torch()
    path = Path(diff_dir) / DELTA_FILE
    if not path.exists():
        raise LionError(f"{diff_dir}: no {DELTA_FILE}; is this a `lion-ray weights diff` output?")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise LionError(f"{path}: unknown delta format {meta.get('format')!r} (expected {FORMAT})")
    base = load_tensors(base_dir)
    got = checksum(base)
    if got != meta["base_sha256"]:
        raise LionError(
            f"{base_dir} is not the base this delta was made against (sha256 {got[:12]}..., expected "
            f"{meta['base_sha256'][:12]}...); recover with the exact base weights, in the same dtype"
        )
    delta = load_file(str(path))
    dtypes = json.loads(meta["dtypes"])
    tuned = {}
    for name, d in delta.items():
        if name.endswith(ADDED):
            continue
        dtype = getattr(torch, dtypes[name])
        t = _from_bits(torch.bitwise_xor(d, _bits(base[name])), dtype)
        if name + ADDED in delta:
            t = torch.cat([t, delta[name + ADDED]])
        tuned[name] = t
    got = checksum(tuned)
    if got != meta["tuned_sha256"]:
        raise LionError(
            f"integrity check failed: the recovered weights hash to {got[:12]}..., the delta "
            f"promised {meta['tuned_sha256'][:12]}...; the delta file may be corrupted"
        )
    with tempfile.TemporaryDirectory(prefix="lion-recover-") as tmp:
        _save_sharded(tuned, Path(tmp))
        _copy_side_files(Path(diff_dir), Path(tmp))
        _publish(Path(tmp), out_dir)
    return {"tensors": len(tuned), "tuned_sha256": got}


def local(uri: str) -> str:
    if not storage.is_local(uri):
        raise LionError(
            f"{uri}: weights commands work on local directories; copy the model locally first"
        )
    return storage.resolve(uri)[1]
