"""Student inference: the hf backend for real on CPU, on a local Ray cluster."""

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import ray.cloudpickle

from lion_ray.config import StudentConfig
from lion_ray.engines.inference import (
    HFGenerator,
    HFPredictor,
    StudentEngineError,
    student_answers,
)
from lion_ray.logic.pools import import_records
from lion_ray.sandbox.tasks import generate_tasks

from ..conftest import MEMORIZED, ROOT

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test predictors travel to actors


def _pool(n, seed=0):
    return import_records(
        [(t.as_record(), "x") for t in generate_tasks(n, seed=seed)], source="test"
    )[0]


def test_generator_decodes_only_new_tokens_and_stops_at_eos(taught_student):
    gen = HFGenerator(str(taught_student), prompt_format="compact", max_new_tokens=12, batch_size=8)
    out = gen.generate([(i, "") for i, _ in MEMORIZED])
    assert [o["answer"] for o in out] == [a for _, a in MEMORIZED]
    assert all(o["finish_reason"] == "stop" for o in out)
    tok = gen.tokenizer
    for (inst, ans), o in zip(MEMORIZED, out, strict=True):
        assert (
            o["completion_tokens"] == len(tok(ans, add_special_tokens=False).input_ids) + 1
        )  # + EOS
        assert o["prompt_tokens"] == len(gen.format.prompt_ids(inst, ""))


def test_batching_and_left_padding_do_not_change_greedy_answers(tiny_student):
    items = [(t.instruction, "") for t in generate_tasks(12, seed=5)]
    one = HFGenerator(
        str(tiny_student), prompt_format="compact", max_new_tokens=6, batch_size=1
    ).generate(items)
    many = HFGenerator(
        str(tiny_student), prompt_format="compact", max_new_tokens=6, batch_size=12
    ).generate(items)
    assert [o["answer"] for o in one] == [o["answer"] for o in many]
    assert all(o["finish_reason"] == "length" and o["completion_tokens"] == 6 for o in many)


def test_stage_answers_every_row_in_order(ray_local, taught_student):
    pool = _pool(70)
    cfg = StudentConfig(
        model_path=str(taught_student),
        prompt_format="compact",
        max_new_tokens=4,
        batch_size=16,
        num_engines=2,
        cpus_per_engine=0.5,
    )
    table, summary = student_answers(pool, cfg, show_progress=False)
    assert table.column("id").to_pylist() == pool.column("id").to_pylist()
    assert summary["ok"] == 70 and summary["failed"] == 0


class FlakyPredictor(HFPredictor):
    """Fails the first attempt of every batch: the retry must absorb it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        real = self.generator.generate_ids
        seen = set()

        def flaky(prompts, **sampling):
            key = repr(prompts)
            if key not in seen:
                seen.add(key)
                raise RuntimeError("transient failure")
            return real(prompts, **sampling)

        self.generator.generate_ids = flaky


class BrokenPredictor(HFPredictor):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)

        def broken(prompts, **sampling):
            raise ValueError("this batch always fails")

        self.generator.generate_ids = broken


class DyingPredictor(HFPredictor):
    """The actor process dies on its first batch (once per test): Ray restarts it and redoes the rows."""

    flag = None

    def __call__(self, batch):
        if self.flag and os.path.exists(self.flag):
            os.remove(self.flag)
            os._exit(1)
        return super().__call__(batch)


def test_failing_batches_are_retried_or_marked(ray_local, taught_student):
    cfg = StudentConfig(
        model_path=str(taught_student), prompt_format="compact", max_new_tokens=3, batch_size=10
    )
    pool = _pool(25, seed=1)
    table, summary = student_answers(pool, cfg, show_progress=False, predictor_cls=FlakyPredictor)
    assert summary["ok"] == 25
    # an engine that fails every batch fails the stage, with the first error
    with pytest.raises(StudentEngineError, match=r"25 of 25 rows failed.*this batch always fails"):
        student_answers(pool, cfg, show_progress=False, predictor_cls=BrokenPredictor)
    # a stage that is allowed to lose rows keeps them, marked
    lenient = cfg.model_copy(update={"max_failed_fraction": 1.0})
    table, summary = student_answers(
        pool, lenient, show_progress=False, predictor_cls=BrokenPredictor
    )
    rows = table.to_pylist()
    assert len(rows) == 25 and summary["failed"] == 25
    assert all(
        r["status"] == "failed" and "always fails" in r["error"] and r["answer"] == "" for r in rows
    )


class HalfBrokenPredictor(HFPredictor):
    """Every row whose id ends in 0 fails (about one in sixteen): an engine that is half up."""

    def __call__(self, batch):
        if any(i.endswith("0") for i in batch.column("id").to_pylist()):
            return _failed(batch)
        return super().__call__(batch)


def _failed(batch):
    from lion_ray.engines.student.rows import answers_table

    rows = batch.to_pylist()
    return answers_table(rows, [None] * len(rows), "RuntimeError: engine died")


def test_the_failed_fraction_decides_whether_a_stage_goes_on(ray_local, taught_student):
    cfg = StudentConfig(
        model_path=str(taught_student), prompt_format="compact", max_new_tokens=3, batch_size=1
    )
    pool = _pool(40, seed=3)
    failing = sum(i.endswith("0") for i in pool.column("id").to_pylist())
    assert 0 < failing < 40
    fraction = failing / 40
    ok = cfg.model_copy(update={"max_failed_fraction": fraction})
    _, summary = student_answers(pool, ok, show_progress=False, predictor_cls=HalfBrokenPredictor)
    assert summary["failed"] == failing
    strict = cfg.model_copy(update={"max_failed_fraction": fraction * 0.99})
    with pytest.raises(StudentEngineError, match="engine died"):
        student_answers(pool, strict, show_progress=False, predictor_cls=HalfBrokenPredictor)


def test_dead_actor_is_restarted_and_rows_redone(ray_local, taught_student, tmp_path):
    flag = tmp_path / "die-once"
    flag.write_text("")
    DyingPredictor.flag = str(flag)
    cfg = StudentConfig(
        model_path=str(taught_student), prompt_format="compact", max_new_tokens=3, batch_size=10
    )
    pool = _pool(30, seed=2)
    table, summary = student_answers(pool, cfg, show_progress=False, predictor_cls=DyingPredictor)
    assert not flag.exists()  # it did die
    assert summary["ok"] == 30 and table.column("id").to_pylist() == pool.column("id").to_pylist()


def test_missing_model_is_a_clear_error(ray_local, tmp_path):
    from lion_ray.errors import LionError

    with pytest.raises(LionError, match="without config.json; expected a Hugging Face model"):
        student_answers(_pool(2), StudentConfig(model_path=str(tmp_path)), show_progress=False)
    with pytest.raises(LionError, match="is not a local model directory or an object-store URI"):
        student_answers(
            _pool(2), StudentConfig(model_path=str(tmp_path / "nowhere")), show_progress=False
        )


@pytest.mark.slow
def test_cli_answers_a_pool_with_the_student(taught_student, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(f'{{"instruction": "{i}"}}\n' for i, _ in MEMORIZED))
    out = tmp_path / "answers.parquet"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "lion_ray",
            "answer",
            "--model",
            str(taught_student),
            "--input",
            str(pool),
            "--output",
            str(out),
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
    assert res.returncode == 0, res.stderr[-2000:]
    rows = pq.read_table(out).to_pylist()
    assert [r["answer"] for r in rows] == [a for _, a in MEMORIZED]


def test_student_loss_is_the_training_loss_row_by_row(taught_student):
    """Batched, right-padded scoring gives each row exactly the loss training computes for
    it alone; a memorized answer costs the student less than a wrong one."""
    import torch

    student = StudentConfig(prompt_format="compact", batch_size=4)
    generator = HFGenerator.for_student(str(taught_student), student)
    items = [(q, "", a) for q, a in MEMORIZED] + [(MEMORIZED[0][0], "", "a wrong answer, long")]
    losses = generator.losses(items, max_length=24)  # train.max_length: answers are cut
    for item, loss in zip(items, losses, strict=True):
        example = generator.format.example(*item, 24)
        with torch.no_grad():
            alone = generator.model(
                input_ids=torch.tensor([example.input_ids]),
                labels=torch.tensor([example.labels]),
            ).loss.item()
        assert loss == pytest.approx(alone, rel=1e-4, abs=1e-5)
    assert max(losses[:3]) < losses[3]
