"""Test helpers that are not fixtures."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def memorize(
    model_dir: Path,
    pairs: list[tuple[str | list[dict], str]],
    template: str = "compact",
    steps: int = 150,
) -> None:
    """Teach a tiny student to answer ``pairs`` exactly (plain torch, in-process, ~seconds).
    A question is an instruction, or (with the chat format) a whole conversation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lion_ray.formats import PromptFormat
    from lion_ray.logic.examples import pad_batch, unpacked

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    fmt = PromptFormat(tok, template)
    examples = [
        fmt.conversation_example(q, a, 256) if isinstance(q, list) else fmt.example(q, "", a, 256)
        for q, a in pairs
    ]
    batch = {k: torch.tensor(v) for k, v in pad_batch(unpacked(examples), tok.pad_token_id).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(
            input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"]
        ).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(model_dir)


# Ray Train's default controller pacing: each checkpoint waits up to 2 s for the controller,
# which keeps an attempt in training long enough for a test to kill it there.
SLOW_CHECKPOINTS = ("--set", "train.poll_interval_s=2")


def registered_checkpoints(train_dir) -> int:
    """Checkpoints Ray Train has registered in ``train_dir`` (a path or a URI): the ones a
    rerun resumes from. A ``checkpoint_*`` folder appears before its registration, so a
    test that kills a run as soon as the folder exists may leave nothing to resume."""
    import json

    from lion_ray import storage

    snapshot = storage.join(str(train_dir), "checkpoint_manager_snapshot.json")
    try:
        return len(json.loads(storage.read_text(snapshot))["checkpoint_results"])
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers_table(rows: list[dict]):
    """Answer rows (id, instruction, answer, and whatever else is given) in ANSWER_SCHEMA,
    the other fields neutral: what a teacher or student stage would have written."""
    import pyarrow as pa

    from lion_ray.logic.pools import ANSWER_SCHEMA

    neutral = {
        "input": "",
        "status": "ok",
        "error": "",
        "finish_reason": "stop",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "cost_usd": 0.0,
        "cached": False,
    }
    return pa.Table.from_pylist([neutral | r for r in rows], schema=ANSWER_SCHEMA)


def answer_command(config: str, pool, output, run_dir, *sets: str) -> list[str]:
    """`lion-ray answer --role teacher` over a pool, as a user types it."""
    import sys

    cmd = [sys.executable, "-m", "lion_ray", "answer", "--role", "teacher", "--config", config]
    cmd += ["--input", str(pool), "--output", str(output), "--set", f"storage.run_dir={run_dir}"]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def http_json(
    url: str, key: str | None = None, body: dict | bytes | None = None, timeout: float = 120
) -> tuple[int, dict]:
    """One JSON request (POST when there is a body, else GET), with an optional bearer
    key: (status, decoded body), error statuses included; a body that is not JSON (Serve's
    own 503, say) comes back as {"text": ...}."""
    import json
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        method="GET" if body is None else "POST",
        data=data,
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {key}"} if key else {}),
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"text": raw.decode(errors="replace")}


class MotoS3:
    """moto's standalone S3 server in its own process, on a free port, and the environment
    that points boto3 and pyarrow (ours, Ray's, every Ray worker's started after it) at it.
    ``with MotoS3(buckets) as env:`` sets the environment and restores it afterwards."""

    def __init__(self, *buckets: str):
        self.buckets = buckets
        self.env: dict = {}
        self.server = None
        self.saved: dict = {}

    def __enter__(self) -> dict:
        import urllib.error
        import urllib.request

        port = str(free_port())  # taken now, not earlier: nothing else grabs it meanwhile
        self.env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.env["AWS_ENDPOINT_URL"], timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if time.time() > deadline or self.server.poll() is not None:
                    self.server.kill()
                    raise RuntimeError("moto's S3 server did not start within 60 s") from None
                time.sleep(0.2)
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"])
        for bucket in self.buckets:
            s3.create_bucket(Bucket=bucket)
        return self.env

    def __exit__(self, *exc) -> None:
        import os

        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.server.kill()
        self.server.wait()


def lion_cli(*args: str, timeout: float = 600, env: dict | None = None, **kw):
    """`lion-ray ARGS` as a user runs it, in the checkout, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "lion_ray", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        **kw,
    )


def until(condition, what: str, timeout_s: float = 120, poll_s: float = 0.1) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(poll_s)


def tiny_train(**overrides):
    """A TrainConfig small enough for the tiny students on 2 CPU cores."""
    from lion_ray.config import TrainConfig

    fields = dict(
        lr=3e-3,
        epochs=2,
        max_length=96,
        micro_batch_size=4,
        effective_batch_size=8,
        workers=2,
    )
    return TrainConfig(**(fields | overrides))


class Hammer:
    """Threads asking a chat endpoint one question over and over (a swap under load):
    every outcome kept as (HTTP status, answer, error code, Retry-After).

        with Hammer(url, question, key=KEY) as load:
            ...                                   # swap something
            load.wait_for(new_answer)
        assert load.failures() == []
    """

    def __init__(self, url: str, question: str, key: str | None = None, threads: int = 4):
        import threading

        self.url, self.key = url, key
        self.ask = {"messages": [{"role": "user", "content": question}], "max_tokens": 12}
        self.outcomes: list[tuple[int, str, str | None, str | None]] = []
        self.stop = threading.Event()
        # daemon, and stopped on exit: a failed assertion must not leave them looping
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        import json
        import time
        import urllib.error
        import urllib.request

        while not self.stop.is_set():
            req = urllib.request.Request(
                f"{self.url}/v1/chat/completions",
                data=json.dumps(self.ask).encode(),
                headers={"Content-Type": "application/json"}
                | ({"Authorization": f"Bearer {self.key}"} if self.key else {}),
            )
            try:
                with urllib.request.urlopen(req, timeout=300) as resp:
                    code, raw, headers = resp.status, resp.read(), resp.headers
            except urllib.error.HTTPError as exc:
                code, raw, headers = exc.code, exc.read(), exc.headers
            except OSError as exc:  # the connection itself failed
                self.outcomes.append((0, "", repr(exc), None))
                continue
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"error": {"code": raw.decode(errors="replace")[:200]}}
            answer = body["choices"][0]["message"]["content"] if code == 200 else ""
            error = None if code == 200 else (body.get("error") or {}).get("code")
            self.outcomes.append((code, answer, error, headers.get("Retry-After")))
            if code == 503:
                time.sleep(0.05)  # as a client told Retry-After would back off

    def __enter__(self) -> Hammer:
        for t in self.threads:
            t.start()
        until(lambda: len(self.outcomes) >= 2, "the first answers")
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)

    def answers(self) -> list[str]:
        return [a for code, a, _, _ in self.outcomes if code == 200]

    def refused(self) -> list[tuple]:
        return [o for o in self.outcomes if o[0] == 503]

    def failures(self) -> list[tuple]:
        return [o for o in self.outcomes if o[0] not in (200, 503)]

    def wait_for(self, answer: str, timeout_s: float = 60) -> None:
        """Until the newest answer is ``answer`` (a swap has reached the clients)."""
        until(lambda: self.answers()[-1:] == [answer], f"the answer {answer!r}", timeout_s, 0.2)


class LocalCluster:
    """Head + workers started with the project's scripts; stopped by killing only the
    processes of this cluster (`ray stop` would also stop the test session's own Ray)."""

    def __init__(
        self, workers: int = 1, cpus: int = 4, head_env: dict | None = None, dashboard: bool = True
    ):
        # short paths: Ray's unix sockets live under the temp dir (107-byte limit)
        base = Path(tempfile.mkdtemp(prefix="lr-", dir="/tmp"))
        self.port, self.dashboard = free_port(), free_port()
        self.dirs = [base / "h"] + [base / f"w{i}" for i in range(workers)]
        self.base = base
        self.cpus = cpus
        self.with_dashboard = dashboard  # `ray job submit` needs it; connecting drivers do not
        self.head_env = head_env or {}  # e.g. secrets that only the head node's pod has
        self.env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "RAY_AUTH_MODE": "token",
            "RAY_ADDRESS": "",
        }

    def sh(
        self, *cmd: str, timeout: float = 120, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        res = subprocess.run(
            cmd, cwd=ROOT, env=env or self.env, capture_output=True, text=True, timeout=timeout
        )
        assert res.returncode == 0, f"{cmd}: {res.stdout[-1500:]} {res.stderr[-1500:]}"
        return res

    def __enter__(self) -> LocalCluster:
        self.sh(
            "cluster/local/start-head.sh",
            "--port",
            str(self.port),
            "--dashboard-port",
            str(self.dashboard),
            "--dashboard-host",
            "127.0.0.1",
            "--num-cpus",
            str(self.cpus),
            "--temp-dir",
            str(self.dirs[0]),
            # each node its own dashboard agent port: Ray's default (52365) may be held by
            # another Ray on this machine, and a head without an agent runs no job
            "--agent-port",
            str(free_port()),
            *([] if self.with_dashboard else ["--no-dashboard"]),
            env={**self.env, **self.head_env},
        )
        for d in self.dirs[1:]:
            self.sh(
                "cluster/local/start-worker.sh",
                f"127.0.0.1:{self.port}",
                "--num-cpus",
                str(self.cpus),
                "--temp-dir",
                str(d),
                "--agent-port",
                str(free_port()),
            )
        return self

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def submit(self, *entrypoint: str, timeout: float) -> subprocess.CompletedProcess:
        """`ray job submit` of this working tree, as a user runs it against the dashboard.
        ``entrypoint``: the job's command, word by word (Ray quotes each word). Right after
        `ray start` the head's job agent may not be registered yet (Ray waits 10 s for it,
        then answers "No available agent ... try again later"): try again, for longer on a
        machine busy with other tests."""
        deadline = time.monotonic() + 300
        while True:
            res = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url]
                + ["--working-dir", ".", "--", *entrypoint],
                cwd=ROOT,
                env={**self.env, "RAY_ADDRESS": ""},
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if "No available agent" not in res.stderr + res.stdout or time.monotonic() > deadline:
                return res
            time.sleep(2)

    def driver_log(self, pid: int, chars: int = 3000) -> str:
        """The end of Ray's own log for the driver process ``pid`` on this cluster: what
        Ray saw of a connected driver that exited non-zero with nothing on its console."""
        logs = sorted(
            (self.dirs[0] / "session_latest" / "logs").glob(f"python-core-driver-*_{pid}.log")
        )
        return "\n".join(f"{p.name}: ...{p.read_text(errors='replace')[-chars:]}" for p in logs)

    def node_ids(self) -> set[str]:
        code = (
            f"import ray, json; ray.init(address='127.0.0.1:{self.port}'); "
            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))"
        )
        out = self.sh(sys.executable, "-c", code, timeout=60).stdout.strip().splitlines()[-1]
        return set(json.loads(out))

    def __exit__(self, *exc) -> None:
        marks = [str(d) for d in self.dirs] + [f":{self.port}"]
        victims = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if any(m in cmd for m in marks) and p.pid != os.getpid():
                victims.append(p)
        for p in victims:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims, timeout=10)
        shutil.rmtree(self.base, ignore_errors=True)
