"""Student checkpoints: where they are, what they are, and loading them the same way everywhere.

A student directory is a Hugging Face model (config.json + weights + tokenizer), or a LoRA
adapter (adapter_config.json + adapter weights + tokenizer) with ``lion_ray_base.json``
naming the model it adapts. Directories lion-ray writes carry ``lion_ray_checksums.json``.
Torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile

from lion_ray import storage
from lion_ray.errors import LionError

BASE_POINTER = "lion_ray_base.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(text: str) -> bool:
    """'org/name', as a model hub names a model (and no local path by that name exists)."""
    return bool(_HUB_ID.match(text)) and not os.path.exists(text)


def is_adapter(model_dir: str) -> bool:
    return storage.exists(storage.join(storage.current(model_dir), "adapter_config.json"))


def check_model_path(uri: str, field: str = "student.model_path") -> None:
    """Refuse, before any work starts, a model path that cannot be loaded."""
    if "://" in uri:
        files = storage.current(uri)
        if not storage.exists(storage.join(files, "config.json")) and not is_adapter(uri):
            raise LionError(
                f"{field}: {uri} holds no config.json; expected a Hugging Face model directory "
                "(config.json, weights, tokenizer) at that URI"
            )
        return
    path = os.path.abspath(os.path.expanduser(uri))
    if os.path.isdir(path):
        if not (os.path.exists(os.path.join(path, "config.json")) or is_adapter(path)):
            raise LionError(
                f"{field}: {path} is a directory without config.json; expected a Hugging Face "
                "model directory (config.json, weights, tokenizer)"
            )
        return
    if _HUB_ID.match(uri) and not os.environ.get("HF_HUB_OFFLINE"):
        return  # a hub id, resolved where a hub is reachable (see local_model_dir)
    raise LionError(
        f"{field}: {uri} is not a local model directory or an object-store URI"
        + (" (and hub ids are off: HF_HUB_OFFLINE is set)" if _HUB_ID.match(uri) else "")
        + "; point it at a Hugging Face model directory (config.json, weights, tokenizer)"
    )


def local_model_dir(model_uri: str) -> str:
    """A local directory holding the model: a local path as is; an object-store URI copied
    once per machine (a copy is trusted only when its checksums match); a hub id through
    the hub's own cache."""
    if storage.is_local(model_uri):
        path = storage.resolve(model_uri)[1]
        if os.path.isdir(path):
            if not (os.path.exists(os.path.join(path, "config.json")) or is_adapter(path)):
                raise LionError(f"{model_uri}: not a Hugging Face model directory (no config.json)")
            return path
        if _HUB_ID.match(model_uri) and not os.environ.get("HF_HUB_OFFLINE"):
            from huggingface_hub import snapshot_download

            return snapshot_download(model_uri)
        raise LionError(f"{model_uri}: no such model directory")
    model_uri = storage.current(model_uri)  # a new version gets its own copy
    target = os.path.join(
        tempfile.gettempdir(),
        "lion-ray-models",
        hashlib.sha256(model_uri.encode()).hexdigest()[:16],
    )
    remote_marker = storage.join(model_uri, storage.CHECKSUMS)
    if storage.verify_checksums(target) is None and (
        not storage.exists(remote_marker)
        or storage.read_bytes(remote_marker)
        == storage.read_bytes(os.path.join(target, storage.CHECKSUMS))
    ):
        return target  # complete, and the same content as the store's copy
    staging = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    storage.download_dir(model_uri, staging)
    problem = storage.verify_checksums(staging, deep=True)
    if problem and storage.exists(storage.join(staging, storage.CHECKSUMS)):
        shutil.rmtree(staging, ignore_errors=True)
        raise LionError(f"{model_uri}: the copy does not match its checksums ({problem})")
    if problem:  # a model from elsewhere: record what we copied, so the next use can check
        storage.write_checksums(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def local_tokenizer_dir(model_uri: str) -> str:
    """A local directory with the model's tokenizer and configs but none of its weights:
    the driver needs the tokenizer (prompt ids) of a model that engines on other nodes
    download themselves, so a multi-GB model is never copied to the head for it."""
    if storage.is_local(model_uri):
        return local_model_dir(model_uri)
    import pyarrow.fs as pafs

    files = storage.current(model_uri)
    target = os.path.join(
        tempfile.gettempdir(),
        "lion-ray-tokenizers",
        hashlib.sha256(files.encode()).hexdigest()[:16],
    )
    if os.path.exists(os.path.join(target, ".complete")):
        return target
    fs, root = storage.resolve(files)
    root = root.rstrip("/")
    staging = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        if info.type != pafs.FileType.File or info.base_name.endswith(WEIGHT_SUFFIXES):
            continue
        with (
            fs.open_input_stream(info.path) as src,
            open(os.path.join(staging, info.base_name), "wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
    open(os.path.join(staging, ".complete"), "w").close()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def read_model_json(model_uri: str, name: str) -> dict:
    """A small JSON file of a model directory (config.json, adapter_config.json), read where
    the model is, without copying the model."""
    return storage.read_json(storage.join(storage.current(model_uri), name))


# config.json keys that say nothing about the weights' shapes
_VOLATILE_CONFIG = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"}


# what turns text into ids and back: two students of one shape may still differ here (tiny
# students trained on other texts, a fine-tune with added tokens)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
# every file a tokenizer may be saved in; an export carries its base's unchanged
TOKENIZER_FILES = (
    *_TOKENIZER_FILES,
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# texts whose ids two tokenizers must agree on to be one: words, digits, spacing, bytes
_PROBES = (
    "Reverse 'kato'. What is 17 + 25?  Tabs\tand\nnew lines.",
    "Unicode: naïve café, 東京, emoji 🙂, and punctuation!?;:",
    "   leading spaces, trailing   ",
)


def fits_in_place(a: str, b: str) -> bool:
    """Whether the second model can replace the first inside a running engine: weights of
    one shape and one tokenizer (a new round of the same student). Else a new engine must
    load it, since a reload moves weights only."""

    def shape(d: str) -> dict:
        config = storage.read_json(storage.join(storage.current(d), "config.json"))
        return {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG}

    return shape(a) == shape(b) and same_tokenizer(a, b)


def same_tokenizer(a: str, b: str) -> bool:
    """Whether two models' tokenizers turn text into the same ids and back: the same files,
    or the same vocabulary, merges, special and added tokens, chat template and ids for a
    set of probe texts. Saving a tokenizer with another transformers version rewrites its
    files (class name, added keys, an empty normalizer spelled out) without changing what
    it does, so files alone would call every re-saved round a new tokenizer."""

    def files(d: str) -> dict:
        root = storage.current(d)
        found = (storage.join(root, name) for name in _TOKENIZER_FILES)
        return {f.rsplit("/", 1)[-1]: storage.read_bytes(f) for f in found if storage.exists(f)}

    if files(a) == files(b):
        return True
    return _tokenizer_behaviour(a) == _tokenizer_behaviour(b)


def _tokenizer_behaviour(model_uri: str) -> dict:
    tok = load_tokenizer(local_tokenizer_dir(model_uri))
    backend = getattr(tok, "backend_tokenizer", None)
    merges = None
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        merges = [
            tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])
        ]
    return {
        "vocab": tok.get_vocab(),
        "merges": merges,
        "special": {name: str(value) for name, value in tok.special_tokens_map.items()},
        "added": {str(t): i for i, t in tok.added_tokens_decoder.items()},
        "chat_template": tok.chat_template,
        "probes": [tok(text)["input_ids"] for text in _PROBES],
        "decoded": [tok.decode(tok(text)["input_ids"]) for text in _PROBES],
    }


def copy_tokenizer(src_dir: str, dst_dir: str) -> bool:
    """Copy a model directory's tokenizer files unchanged (False when it has none): an
    export carries its base's tokenizer byte for byte, so the next round's weights move into
    a running engine without a new one."""
    copied = False
    for name in TOKENIZER_FILES:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dst_dir, name))
            copied = True
    return copied


def checksums_differ(a: str, b: str) -> bool:
    """Whether two exported models hold different weights, by their checksum files (False
    when either has none: nothing is known)."""
    files = [storage.join(storage.current(d), storage.CHECKSUMS) for d in (a, b)]
    if not all(storage.exists(f) for f in files):
        return False
    return storage.read_bytes(files[0]) != storage.read_bytes(files[1])


def adapter_base(adapter_dir: str) -> str:
    """The model an exported adapter adapts (relative to the adapter when both are local, so
    a moved run directory still finds it)."""
    pointer = storage.read_json(storage.join(adapter_dir, BASE_POINTER))
    if pointer.get("relative") and storage.is_local(adapter_dir):
        candidate = os.path.normpath(os.path.join(adapter_dir, pointer["relative"]))
        if os.path.isdir(candidate):
            return candidate
    return pointer["base"]


def write_base_pointer(adapter_dir: str, base_uri: str, final_uri: str) -> None:
    """Record the base of an adapter that will be published at ``final_uri``."""
    relative = None
    if storage.is_local(base_uri) and storage.is_local(final_uri):
        relative = os.path.relpath(storage.resolve(base_uri)[1], storage.resolve(final_uri)[1])
    storage.write_json(
        storage.join(adapter_dir, BASE_POINTER), {"base": base_uri, "relative": relative}
    )


def checkpoint_dtype(model_dir: str):
    """The dtype a checkpoint was saved in (config.json's dtype, float32 when unsaid)."""
    import torch

    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."), torch.float32)


def compute_dtype(model_dir: str, dtype: str, on_gpu: bool):
    """'auto': the checkpoint's dtype on GPU, float32 on CPU; or the named dtype."""
    import torch

    if dtype == "auto":
        return checkpoint_dtype(model_dir) if on_gpu else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(model_dir: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    model_uri: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    trainable_adapter: bool = False,
):
    """(model, tokenizer directory) for a model or an exported adapter (loaded on its base)."""
    from transformers import AutoModelForCausalLM

    model_dir = local_model_dir(model_uri)
    base_dir = local_model_dir(adapter_base(model_dir)) if is_adapter(model_dir) else model_dir
    kwargs = {"dtype": compute_dtype(base_dir, dtype, device.startswith("cuda"))}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, trust_remote_code=trust_remote_code, **kwargs
    )
    if model_dir != base_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_dir, is_trainable=trainable_adapter)
    return model.to(device), model_dir
