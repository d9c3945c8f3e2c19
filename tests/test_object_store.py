"""A run directory on a real S3-compatible server (moto's standalone server, over HTTP):
model publishing that never exposes half a copy, cached copies that are checked, and a whole
round of the loop killed, resumed and served from the object store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lion_ray import storage

from .conftest import DATA, ROOT
from .helpers import SLOW_CHECKPOINTS, MotoS3, free_port, registered_checkpoints

BUCKET = "lion-test"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server in its own process, and the environment that points pyarrow (ours,
    Ray Train's, every Ray worker's) at it; restored afterwards."""
    with MotoS3(BUCKET) as env:
        yield env


def _model(tmp_path, name: str, content: bytes):
    local = tmp_path / name
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"name": name}))
    (local / "weights.bin").write_bytes(content)
    storage.write_checksums(local)
    return local


def test_publish_switches_to_a_complete_new_copy(s3_env, tmp_path, monkeypatch):
    uri = f"s3://{BUCKET}/publish/model"
    storage.publish_dir(_model(tmp_path, "a", b"A" * 1000), uri)
    first = storage.current(uri)
    assert first != uri and storage.read_json(storage.join(first, "config.json")) == {"name": "a"}
    # a publish that dies while uploading leaves the old copy current and whole
    real_upload = storage.upload_dir

    def dies_halfway(local_dir, dest):
        storage.write_bytes(storage.join(dest, "config.json"), b"{half")
        raise OSError("connection reset")

    monkeypatch.setattr(storage, "upload_dir", dies_halfway)
    with pytest.raises(OSError):
        storage.publish_dir(_model(tmp_path, "b", b"B" * 1000), uri)
    assert storage.current(uri) == first and storage.verify_checksums(first) is None
    monkeypatch.setattr(storage, "upload_dir", real_upload)
    storage.publish_dir(_model(tmp_path, "c", b"C" * 1000), uri)
    now = storage.current(uri)
    assert now != first and storage.read_json(storage.join(now, "config.json")) == {"name": "c"}
    assert not storage.exists(first)  # the old version is gone once the new one is current
    left = {p.rsplit("/", 1)[1] for p in storage.list_files(uri)}
    assert left == {storage.CURRENT}


def test_a_cached_copy_is_used_only_while_it_matches(s3_env, tmp_path):
    from lion_ray.models import local_model_dir

    uri = f"s3://{BUCKET}/cached/model"
    storage.publish_dir(_model(tmp_path, "a", b"A" * 1000), uri)
    copy = local_model_dir(uri)
    assert Path(copy, "weights.bin").read_bytes() == b"A" * 1000
    assert local_model_dir(uri) == copy  # verified, reused
    with open(os.path.join(copy, "weights.bin"), "wb") as f:  # a truncated copy
        f.write(b"A" * 10)
    again = local_model_dir(uri)
    assert Path(again, "weights.bin").read_bytes() == b"A" * 1000
    storage.publish_dir(_model(tmp_path, "b", b"B" * 1000), uri)  # a redone round
    newer = local_model_dir(uri)
    assert Path(newer, "weights.bin").read_bytes() == b"B" * 1000
    # a store copy whose files do not match its own checksums is refused, not trusted
    broken = f"s3://{BUCKET}/cached/broken"
    storage.upload_dir(_model(tmp_path, "c", b"C" * 1000), broken)
    storage.write_bytes(storage.join(broken, "weights.bin"), b"D" * 1000)
    from lion_ray.errors import LionError

    with pytest.raises(LionError, match="does not match its checksums"):
        local_model_dir(broken)


def _all_paths(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return [i.path for i in fs.get_file_info(selector)]


def _lion(*args: str, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lion_ray", *args],
        cwd=ROOT,
        env={**os.environ, **env, "RAY_ADDRESS": ""},
        start_new_session=True,
        **kw,
    )


@pytest.mark.slow
def test_a_round_on_s3_killed_resumed_and_served(s3_env, tmp_path):
    run = f"s3://{BUCKET}/runs/mini"
    args = (
        *("run", "--config", str(DATA / "mini.yaml")),
        *("--set", f"storage.run_dir={run}", "--set", "train.epochs=6"),
        *("--set", "train.checkpoint_every_steps=4", "--set", "sandbox.heldout_tasks=10"),
        *("--set", "loop.hard_per_round=6", "--set", "loop.easy_per_round=4"),
    )
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - the child writes to it
    first = _lion(*args, *SLOW_CHECKPOINTS, env=s3_env, stdout=log, stderr=subprocess.STDOUT)
    train_dir = f"{run}/round_1/imitation/train"
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        if registered_checkpoints(train_dir) > 0:
            break
        time.sleep(0.5)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies mid-training
    first.wait()
    manifest = storage.read_json(f"{run}/manifest.json")
    assert "round_1/imitation.train" not in manifest["stages"]
    assert "round_1/imitation.teacher" in manifest["stages"]

    rerun = _lion(*args, env=s3_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-4000:]
    manifest = storage.read_json(f"{run}/manifest.json")
    assert manifest["finished_rounds"] == 1
    final = storage.read_json(f"{train_dir}/final.json")
    assert final["resumed_from_step"] > 0 and final["step"] == final["total_steps"]
    model = storage.current(f"{run}/round_1/imitation/model")
    assert model != f"{run}/round_1/imitation/model"  # published as a version, then switched
    assert storage.verify_checksums(model) is None

    port = free_port()
    serve_log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - a file, never a full pipe
    server = _lion(
        *("serve", "--run", run, "--port", str(port)),
        env=s3_env,
        stdout=serve_log,
        stderr=subprocess.STDOUT,
    )
    try:
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.time() + 240
        while True:
            try:
                models = client.models.list()
                break
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(
                        "lion-ray serve --run s3://... did not come up: "
                        + (tmp_path / "serve.log").read_text()[-3000:]
                    )
                time.sleep(1)
        assert models.data[0].root == f"{run}/round_1/imitation/model"
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Reverse 'kato'."}], max_tokens=8
        )
        assert reply.usage.completion_tokens >= 1
        deadline = time.time() + 60  # what a user waits for before pressing Ctrl-C
        while "Ctrl-C to stop" not in (tmp_path / "serve.log").read_text():
            assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            assert server.wait(timeout=120) == 0
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
