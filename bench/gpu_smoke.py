"""The GPU paths on one GPU, each check timed: what no CPU machine can prove.

    pip install -e ".[gpu,dev]" && python -m bench.gpu_smoke        # about 6 minutes on one GPU

Runs the `gpu` tests (tests/gpu/test_gpu.py), each a check:
- bf16 ZeRO-3 training, full and LoRA (gradient checkpointing through partitioned frozen
  weights), of a tiny locally built Qwen2-class student, with a worker that dies and a resume;
  the worker's device is lion-ray's one rule (its own GPU, which DeepSpeed also takes);
- ray.data.llm vLLM inference with a LoRA adapter, and from an s3:// model on a moto server
  (each engine downloads it on its own node; the driver fetches the tokenizer only);
- a vLLM hot swap on one GPU under concurrent clients: a new round's weights into the running
  engine; a model the replica's chat format cannot serve, which must fail before an engine is
  built and leave the replica serving, healthy; then a model of another architecture, which
  must retire the old engine first;
- the colocated engine asleep while Ray Train has the GPU (the worker asking the rest of the
  engine's GPU), then the trained round moved in place (the export carries the base's
  tokenizer) through sleep -> wake weights -> reload -> wake KV cache, and its losses at
  train.max_length equal to the hf backend's;
- one `lion-ray run` round with the student on the GPU (vLLM, colocated): round 1 trains
  before the engine exists, a whole GPU per worker.

The last line is JSON: {"cuda": GPU name, "passed": bool, "checks": {name: {"passed",
"seconds", "error"}}, "wall_s"}. Without a CUDA device it says so and exits 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"cuda": None, "error": "no CUDA device: run this on a GPU machine"}))
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "gpu.xml"
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests/gpu"]
            + [f"--junitxml={report}", "-p", "no:cacheprovider"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        print(tests.stdout[-4000:], tests.stderr[-2000:], sep="\n", flush=True)
        checks = _checks(report) if report.exists() else {}
    print(
        json.dumps(
            {
                "cuda": torch.cuda.get_device_name(0),
                "passed": tests.returncode == 0 and bool(checks),
                "checks": checks,
                "wall_s": round(time.monotonic() - started, 1),
            }
        )
    )
    return 0 if tests.returncode == 0 else 1


def _checks(report: Path) -> dict[str, dict]:
    """Each test case of a junit report: passed, seconds, the first line of its error."""
    out = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        problem = next(
            (
                case.find(tag)
                for tag in ("failure", "error", "skipped")
                if case.find(tag) is not None
            ),
            None,
        )
        message = "" if problem is None else (problem.get("message") or "").splitlines()[:1]
        out[case.get("name")] = {
            "passed": problem is None,
            "seconds": round(float(case.get("time") or 0), 1),
            "error": message[0][:300] if message else "",
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
