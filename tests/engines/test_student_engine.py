"""The run's one student engine: the serving deployment, reached by the stages through Ray
Data, answering as the per-stage engines do, with each round's weights moved into it."""

import contextlib
import shutil
import time

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
def engine(ray_local, taught_student, tmp_path):
    engine = StudentEngine.start(
        STUDENT,
        str(taught_student),
        ServeConfig(port=free_port()),
        app="engine-test",
        record_uri=str(tmp_path / "student_engine.json"),
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
    losses, _ = student_losses(
        rows, STUDENT, model_uri=str(taught_student), max_length=16, engine=engine
    )
    expected, _ = student_losses(rows, STUDENT, model_uri=str(taught_student), max_length=16)
    assert losses == pytest.approx(expected, rel=1e-5)

    # the next round's weights move into the running replicas, all of them, which stay
    # the same replicas (a redeploy from Python would have replaced them)
    replicas = _replica_names(engine.app)
    swap = engine.load(str(taught_student_b))
    assert swap["how"] == "in_place" and swap["serving"] == str(taught_student_b)
    assert _replica_names(engine.app) == replicas and len(replicas) == 2
    from ray import serve

    handle = serve.get_deployment_handle("StudentServer", engine.app)
    reports = [handle.swap_report.remote().result() for _ in range(24)]
    assert {r["serving"] for r in reports} == {str(taught_student_b)}
    # student.colocate: every replica sleeps through training ...
    engine.sleep()
    assert all(r["asleep"] for r in handle.broadcast("swap_report").results(timeout_s=60))
    status, body = http_json(f"{engine.url}/v1/admin/status", timeout=30)  # as an operator sees it
    assert status == 200 and (body["asleep"], body["loaded"]) == (True, True), body
    # ... and one that Serve restarts meanwhile comes back as the engine was last moved
    # (the round it served, asleep), not as it was deployed
    import ray

    victim = sorted(replicas)[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    while len(_replica_names(engine.app) - {victim}) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(_replica_names(engine.app) - {victim}) == 2, "Serve did not replace it"
    restarted = []
    while len(restarted) < 2 and time.monotonic() < deadline:  # the handle learns of it
        with contextlib.suppress(ray.exceptions.RayActorError):  # it still had the killed one
            restarted = handle.broadcast("swap_report").results(timeout_s=60)
        time.sleep(0.2)
    assert [(r["serving"], r["asleep"]) for r in restarted] == [(str(taught_student_b), True)] * 2
    # the restarted one loads nothing while asleep (on a GPU, training holds the memory)
    assert sorted(r["loaded"] for r in restarted) == [False, True]
    engine.load(str(taught_student_b))  # the same round again: woken as it is, or loaded
    woken = handle.broadcast("swap_report").results(timeout_s=60)
    assert [(r["asleep"], r["loaded"]) for r in woken] == [(False, True)] * 2
    # a replica that serves another student than the stage's (moved before the record was
    # written) moves when a request names the stage's student, before it answers
    handle.move_to.remote(str(taught_student)).result(timeout_s=120)
    assert str(taught_student) in {
        r["serving"] for r in handle.broadcast("swap_report").results(timeout_s=60)
    }
    for _ in range(4):  # a batch per row, over both replicas
        moved, _ = student_answers(
            _pool([q for q, _ in MEMORIZED]),
            STUDENT.model_copy(update={"batch_size": 1}),
            model_uri=str(taught_student_b),
            engine=engine,
            show_progress=False,
        )
        assert [r["answer"] for r in moved.to_pylist()] == [a for _, a in MEMORIZED_B]
    healed = handle.broadcast("swap_report").results(timeout_s=60)
    assert [r["serving"] for r in healed] == [str(taught_student_b)] * 2
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


def test_runs_that_are_passed_one_engine_load_their_students_into_it(
    ray_local, taught_student, taught_student_b, tmp_path
):
    """A sweep (a benchmark's arms) passes one running engine to run after run: each run's
    session moves its own student into it instead of starting one, and leaves it up for its
    owner, who stops it."""
    from ray import serve

    from lion_ray.config import LionConfig
    from lion_ray.session import Session

    one_replica = STUDENT.model_copy(update={"num_engines": 1})
    pool = _pool([q for q, _ in MEMORIZED])
    engine = StudentEngine.start(one_replica, str(taught_student), app="engine-passed", http=False)
    replica = serve.get_deployment_handle("StudentServer", "engine-passed")
    first_replicas = _replica_names("engine-passed")
    try:
        for n, (model, expected) in enumerate(
            [(taught_student_b, MEMORIZED_B), (taught_student, MEMORIZED)]
        ):
            cfg = LionConfig(student=one_replica, storage={"run_dir": str(tmp_path / f"r{n}")})
            with Session(cfg, need_ray=False, need_endpoints=False, student_engine=engine) as s:
                assert s.student_engine(str(model)) is engine
                answers, _ = student_answers(
                    pool, one_replica, model_uri=str(model), engine=engine, show_progress=False
                )
            assert [r["answer"] for r in answers.to_pylist()] == [a for _, a in expected]
            swap = replica.swap_report.remote().result()
            assert swap["serving"] == str(model) and swap["how"] == "in_place"
            assert _replica_names("engine-passed") == first_replicas  # moved into, not restarted
            assert serve.status().applications["engine-passed"].status == "RUNNING"  # still up
    finally:
        engine.stop()
    assert "engine-passed" not in _apps()


def test_an_engine_started_in_the_background_is_waited_for_or_stopped(
    ray_local, taught_student, taught_student_b, tmp_path
):
    """The run starts its engine beside the round's first stages: the first stage that
    needs it waits for the start and moves its round's student in; a run that ends before
    any stage used it stops it all the same."""
    from lion_ray.config import LionConfig
    from lion_ray.session import Session

    one_replica = STUDENT.model_copy(update={"num_engines": 1})
    for n, used in enumerate([True, False]):
        cfg = LionConfig(
            student=one_replica,
            serve={"during_run": False},
            storage={"run_dir": str(tmp_path / f"r{n}")},
        )
        with Session(cfg, need_ray=False, need_endpoints=False) as session:
            session.prestart_student_engine(str(taught_student))  # returns before the start
            assert session._student_starting is not None
            if used:
                engine = session.student_engine(str(taught_student_b))
                answers, _ = student_answers(
                    _pool([q for q, _ in MEMORIZED]),
                    one_replica,
                    model_uri=str(taught_student_b),
                    engine=engine,
                    show_progress=False,
                )
                assert [r["answer"] for r in answers.to_pylist()] == [a for _, a in MEMORIZED_B]
        assert not any(app.startswith("lion-run-") for app in _apps())


def _replica_names(app: str) -> set[str]:
    """The app's live student replicas, by actor name (a replacement gets a new one). From
    the connected Ray, not the state API, which cannot choose between two local clusters."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#StudentServer#"
    named = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in named if a["name"].startswith(prefix)}


def _apps() -> set[str]:
    """The Serve applications running now (none when Serve is down)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    if _get_global_client(raise_if_no_controller_running=False) is None:
        return set()
    return set(serve.status().applications)
