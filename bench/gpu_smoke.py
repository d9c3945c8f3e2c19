"""The GPU paths on a GPU machine: the `gpu` tests, then student inference (vLLM on the GPU
against hf on the GPU).

    pip install -e ".[gpu,dev]" && python -m bench.gpu_smoke

Runs `pytest -m gpu` (bf16 DeepSpeed ZeRO-3 on one GPU, vLLM student inference, vLLM serving)
and `bench.student_inference --vllm-device gpu`; the last line is JSON with the GPU's name,
the tests' outcome and the inference figures. Without a CUDA device it says so and exits 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"cuda": None, "error": "no CUDA device: run this on a GPU machine"}))
        return 2
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests/gpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    summary = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-500:]
    print(tests.stdout[-3000:], flush=True)
    bench = subprocess.run(
        [sys.executable, "-m", "bench.student_inference", "--vllm-device", "gpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    lines = bench.stdout.strip().splitlines()
    inference = json.loads(lines[-1]) if bench.returncode == 0 and lines else bench.stderr[-500:]
    print(
        json.dumps(
            {
                "cuda": torch.cuda.get_device_name(0),
                "gpu_tests_passed": tests.returncode == 0,
                "gpu_tests": summary,
                "student_inference": inference,
            }
        )
    )
    return 0 if tests.returncode == 0 and bench.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
