"""The console script, run as a user runs it."""

import os
import subprocess
import sys

import pytest

from .conftest import ROOT
from .helpers import lion_cli

lion = lion_cli


def test_help_lists_commands():
    out = lion("--help")
    assert out.returncode == 0
    for cmd in ["config", "pool", "student", "sandbox"]:
        assert cmd in out.stdout


def test_pool_import_stats_export(tmp_path, seed_tasks_path):
    pool = tmp_path / "p.parquet"
    out = lion("pool", "import", str(seed_tasks_path), "--out", str(pool))
    assert out.returncode == 0, out.stderr
    assert "imported 175 instructions" in out.stdout
    stats = lion("pool", "stats", str(pool), "--json")
    assert stats.returncode == 0 and '"rows": 175' in stats.stdout
    exp = lion("pool", "export", str(pool), "--format", "jsonl", "--out", str(tmp_path / "e.jsonl"))
    assert exp.returncode == 0
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 175


def test_malformed_jsonl_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n{"instruction": "b"\n')
    out = lion("pool", "import", str(bad), "--out", str(tmp_path / "p.parquet"))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bad}:2: invalid JSON" in lines[0]
    assert not (tmp_path / "p.parquet").exists()


def test_config_validate_and_refuse():
    ok = lion("config", "validate", "configs/demo.yaml")
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = lion("config", "validate", "configs/demo.yaml", "--set", "train.zero_stage=1")
    assert bad.returncode == 1 and "train.zero_stage" in bad.stderr
    show = lion("config", "show", "configs/demo.yaml", "--set", "train.lr=0.5")
    assert show.returncode == 0 and "lr: 0.5" in show.stdout


def test_sandbox_tasks_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        res = lion("sandbox", "tasks", "--n", "50", "--seed", "3", "--out", str(out))
        assert res.returncode == 0, res.stderr
    assert a.read_text() == b.read_text()
    import json

    rows = [json.loads(x) for x in a.read_text().splitlines()]
    assert len(rows) == 50 and {"instruction", "output", "family", "difficulty"} <= set(rows[0])


def test_dedup_command(tmp_path, seed_tasks_path):
    import json

    lines = [json.loads(x) for x in seed_tasks_path.read_text().splitlines()]
    cands = tmp_path / "cands.jsonl"
    new = [{"instruction": "Compose a limerick about a cat who learns to code in Rust."}]
    cands.write_text(
        "".join(json.dumps({"instruction": r["instruction"]}) + "\n" for r in lines[:5] + new)
    )
    out = tmp_path / "kept.parquet"
    res = lion(
        "dedup", "--pool", str(seed_tasks_path), "--candidates", str(cands), "--out", str(out)
    )
    assert res.returncode == 0, res.stderr
    assert "kept 1 of 6 candidates" in res.stdout
    import pyarrow.parquet as pq

    assert pq.read_table(out).column("instruction").to_pylist() == [new[0]["instruction"]]


@pytest.mark.slow
def test_cli_chain_teacher_student_discriminate_generate(tmp_path, taught_student, shared_cluster):
    """One round's API stages by hand, as a user would run them from the shell (on the
    worker's running Ray: each step would otherwise start and stop a local Ray of its own)."""
    import pyarrow.parquet as pq

    pool = tmp_path / "pool.jsonl"
    res = lion(
        "sandbox", "tasks", "--n", "40", "--seed", "4", "--max-difficulty", "2", "--out", str(pool)
    )
    assert res.returncode == 0
    common = ["--config", "configs/demo.yaml", "--set", f"storage.run_dir={tmp_path / 'run'}"]
    common += ["--set", f"cluster.address={shared_cluster.address}"]
    env = shared_cluster.env
    steps = [
        [
            "answer",
            "--role",
            "teacher",
            "--input",
            str(pool),
            "--output",
            str(tmp_path / "t.parquet"),
        ],
        [
            "answer",
            "--model",
            str(taught_student),
            "--input",
            str(pool),
            "--output",
            str(tmp_path / "s.parquet"),
        ],
        [
            "discriminate",
            "--pool",
            str(pool),
            "--teacher",
            str(tmp_path / "t.parquet"),
            "--student",
            str(tmp_path / "s.parquet"),
            "--out",
            str(tmp_path / "j.parquet"),
        ],
        [
            "generate",
            "--judged",
            str(tmp_path / "j.parquet"),
            "--pool",
            str(pool),
            "--out",
            str(tmp_path / "new.parquet"),
            "--set",
            "loop.hard_per_round=10",
            "--set",
            "loop.easy_per_round=0",
        ],
    ]
    for step in steps:
        res = lion(*step, *common, env=env, timeout=300)
        assert res.returncode == 0, (step, res.stderr[-2000:])
    judged = pq.read_table(tmp_path / "j.parquet").to_pylist()
    assert len(judged) == 40 and all(r["status"] == "ok" for r in judged)
    assert (
        sum(r["label"] == "hard" for r in judged) >= 30
    )  # the taught student knows 3 tasks at most
    assert pq.read_table(tmp_path / "new.parquet").num_rows == 10


def test_serve_command_until_ctrl_c(tmp_path, taught_student):
    """`lion-ray serve --model DIR` in the foreground: answers, then stops on Ctrl-C."""
    import signal
    import threading
    import time

    from openai import OpenAI

    from .conftest import MEMORIZED
    from .helpers import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lion_ray", "serve", "--model", str(taught_student)]
        + ["--port", str(port), "--set", "student.prompt_format=compact"],
        cwd=ROOT,
        env={**os.environ, "RAY_ADDRESS": "", "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        deadline = time.time() + 180
        while time.time() < deadline and not any("Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)[-3000:]
            lines.append(line)
        assert any(f"http://127.0.0.1:{port}/v1" in line for line in lines), "".join(lines)
        # keep reading: Ray forwards replica logs to this pipe, and a full pipe would block
        # the server's shutdown on a write
        drain = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        drain.start()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        question, answer = MEMORIZED[1]
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": question}], max_tokens=12
        )
        assert reply.choices[0].message.content == answer
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 0, "".join(lines)[-3000:]  # Serve and Ray shut down
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_student_path_that_cannot_load_stops_the_run_before_any_call(tmp_path):
    run_dir = tmp_path / "run"
    res = lion(
        "run",
        "--config",
        "tests/data/mini.yaml",
        "--set",
        f"student.model_path={tmp_path / 'missing-model'}",
        "--set",
        f"storage.run_dir={run_dir}",
        env={**os.environ, "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 1
    assert "student.model_path: " in res.stderr and "is not a local model directory" in res.stderr
    assert not (run_dir / "cache").exists() and not (run_dir / "spend").exists()
