"""The run's one student engine: the serving deployment, reached by the stages through Ray
Data, answering as the per-stage engines do, with each round's weights moved into it."""

import shutil

import pytest

from lion_ray.config import ServeConfig, StudentConfig
from lion_ray.engines.inference import student_answers, student_losses
from lion_ray.engines.student_engine import StudentEngine
from lion_ray.logic.pools import import_records

from ..conftest import MEMORIZED, MEMORIZED_B
from ..helpers import free_port, http_json

# two replicas: a round's weights must reach every one of them, not whichever Serve picks
STUDENT = StudentConfig(
    prompt_format="compact", max_new_tokens=12, batch_size=4, num_engines=2, cpus_per_engine=0.5
)


def _pool(questions):
    return import_records([({"instruction": q}, "x") for q in questions], source="t")[0]


@pytest.fixture()
def engine(ray_local, taught_student):
    engine = StudentEngine.start(
        STUDENT, str(taught_student), ServeConfig(port=free_port()), app="engine-test"
    )
    yield engine
    engine.stop()


def test_stages_get_the_per_stage_answers_and_losses_from_one_engine(
    engine, taught_student, taught_student_b, tmp_path
):
    questions = [q for q, _ in MEMORIZED] + [f"Reverse '{w}'." for w in ("ab", "kit", "zorro")]
    pool = _pool(questions * 3)  # several batches, in flight at once
    resident, summary = student_answers(
        pool, STUDENT, model_uri=str(taught_student), engine=engine, show_progress=False
    )
    fresh, _ = student_answers(pool, STUDENT, model_uri=str(taught_student), show_progress=False)
    assert resident.to_pylist() == fresh.to_pylist()
    assert summary["engine"] == "resident" and 0 < summary["compute_s"] <= summary["wall_s"]
    rows = [
        {"id": str(i), "instruction": q, "input": "", "answer": a}
        for i, (q, a) in enumerate([*MEMORIZED, (MEMORIZED[0][0], "wrong")])
    ]
    losses, _ = student_losses(rows, STUDENT, model_uri=str(taught_student), engine=engine)
    expected, _ = student_losses(rows, STUDENT, model_uri=str(taught_student))
    assert losses == pytest.approx(expected, rel=1e-5)

    # the next round's weights move into the running replicas, all of them
    swap = engine.load(str(taught_student_b))
    assert swap["how"] == "in_place" and swap["serving"] == str(taught_student_b)
    from ray import serve

    handle = serve.get_deployment_handle("StudentServer", engine.app)
    reports = [handle.swap_report.remote().result() for _ in range(24)]
    assert {r["serving"] for r in reports} == {str(taught_student_b)}
    moved, _ = student_answers(
        _pool([q for q, _ in MEMORIZED]), STUDENT, model_uri=str(taught_student_b), engine=engine
    )
    assert [r["answer"] for r in moved.to_pylist()] == [a for _, a in MEMORIZED_B]
    # the same engine answers users, on the serving routes
    status, body = http_json(
        f"{engine.url}/v1/chat/completions",
        body={"messages": [{"role": "user", "content": MEMORIZED[0][0]}], "max_tokens": 12},
    )
    assert status == 200 and body["choices"][0]["message"]["content"] == MEMORIZED_B[0][1]

    # a round whose weights cannot move in fails its stage, with the cause
    broken = tmp_path / "broken"
    shutil.copytree(taught_student_b, broken)
    (broken / "model.safetensors").write_bytes(b"torn")
    with pytest.raises(Exception, match="SafetensorError|safetensors|header"):
        engine.load(str(broken))


def test_runs_one_after_another_in_one_process_reach_their_own_engine(
    ray_local, taught_student, taught_student_b
):
    """Two runs in one process (a benchmark's arms, a notebook): the first run's engine shuts
    its Serve down at the end; the second starts a new one, and the stage tasks, run by the
    same warm Ray workers, reach it rather than the first run's dead controller."""
    from ray import serve

    serve.shutdown()  # both engines below start (and so own) their Serve
    one_replica = STUDENT.model_copy(update={"num_engines": 1})
    pool = _pool([q for q, _ in MEMORIZED])
    for model, expected in ((taught_student, MEMORIZED), (taught_student_b, MEMORIZED_B)):
        engine = StudentEngine.start(one_replica, str(model), app="engine-test", http=False)
        try:
            assert engine.owns_serve
            answers, _ = student_answers(
                pool, one_replica, model_uri=str(model), engine=engine, show_progress=False
            )
        finally:
            engine.stop()
        assert [r["answer"] for r in answers.to_pylist()] == [a for _, a in expected]
