"""`lion-ray eval` on the sandbox: tiny students, real judge calls in both orders."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from lion_ray.config import StudentConfig
from lion_ray.evaluation import answer_with_endpoint, answer_with_student, judge_pairs
from lion_ray.logic.evaluation import Question

from .conftest import MEMORIZED, ROOT, sandbox_engine

OTHERS = ["Sort 'dcba' alphabetically.", "Max of 4, 91, 13?", "Shift 'abz' by 2."]


def _questions():
    qs = [Question(f"m{i}", q, "", "memorized") for i, (q, _) in enumerate(MEMORIZED)]
    return qs + [Question(f"o{i}", q, "", "other") for i, q in enumerate(OTHERS)]


def test_relative_scores_from_real_judgements(ray_local, sandbox, taught_student, tmp_path):
    qs = _questions()
    cand = answer_with_student(
        qs, str(taught_student), StudentConfig(prompt_format="compact", max_new_tokens=8)
    )
    ref = answer_with_endpoint(qs, sandbox_engine(sandbox, tmp_path, "teacher"))
    judged, result = judge_pairs(qs, cand, ref, sandbox_engine(sandbox, tmp_path, "referee"))
    rows = {r["id"]: r for r in judged.to_pylist()}
    # both orders were judged, and each side's score is the mean of its two
    for r in rows.values():
        assert (
            r["referee_calls"] == 2 and r["student_score"] == (r["a_student"] + r["b_student"]) / 2
        )
    mem = result["by_category"]["memorized"]
    assert mem["relative_score"] == 100.0 and (mem["wins"], mem["ties"], mem["losses"]) == (0, 3, 0)
    other = result["by_category"]["other"]
    assert other["losses"] == 3 and other["relative_score"] < 50  # the student never learned these
    cand_total = sum(r["student_score"] for r in rows.values())
    ref_total = sum(r["teacher_score"] for r in rows.values())
    assert result["overall"]["relative_score"] == round(100 * cand_total / ref_total, 2)


@pytest.mark.slow
def test_eval_command_offline_on_the_sandbox(taught_student, tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"question_id": q.id, "text": q.text, "category": q.category}) + "\n"
            for q in _questions()
        )
    )
    out = tmp_path / "eval"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "lion_ray",
            "eval",
            "--questions",
            str(questions),
            "--candidate",
            str(taught_student),
            "--reference",
            "sandbox",
            "--judge",
            "sandbox",
            "--out",
            str(out),
            "--config",
            "configs/demo.yaml",
            "--set",
            f"storage.run_dir={tmp_path / 'run'}",
            "--title",
            "taught vs sandbox teacher",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| memorized | 3/3 | 100.0% | 0 | 3 | 0 |" in res.stdout
    data = json.loads((out / "eval.json").read_text())
    assert data["overall"]["scored"] == 6 and data["title"] == "taught vs sandbox teacher"
    assert (out / "by_category.png").stat().st_size > 1000 and (
        out / "eval.md"
    ).read_text().startswith("###")
    answers = pq.read_table(out / "answers.parquet").to_pylist()
    assert {a["candidate"] for a in answers[:3]} == {a for _, a in MEMORIZED}
    # its calls were cached and billed in the config's run directory, against its budgets
    for role in ("teacher", "referee"):
        assert any((tmp_path / "run" / "spend" / role).glob("*.jsonl"))
        assert any((tmp_path / "run" / "cache" / role).glob("*.jsonl"))
    # the same evaluation from answer files (no student, no reference calls)
    ans = tmp_path / "cand.jsonl"
    ans.write_text(
        "".join(
            json.dumps({"question_id": a["question_id"], "answer": a["candidate"]}) + "\n"
            for a in answers
        )
    )
    ref = tmp_path / "ref.jsonl"
    ref.write_text(
        "".join(
            json.dumps({"question_id": a["question_id"], "answer": a["reference"]}) + "\n"
            for a in answers
        )
    )
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "lion_ray",
            "eval",
            "--questions",
            str(questions),
            "--candidate",
            str(ans),
            "--reference",
            str(ref),
            "--judge",
            "sandbox",
            "--out",
            str(tmp_path / "eval2"),
            "--config",
            "configs/demo.yaml",
            "--set",
            f"storage.run_dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "eval2" / "eval.json").read_text())["overall"] == data["overall"]
