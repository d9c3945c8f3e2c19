"""The run's one student engine: the Ray Serve deployment `lion-ray serve` runs, started once.

    engine = StudentEngine.start(cfg.student, model_dir, cfg.serve, train=cfg.train, app="lion-run")
    session.holdings["the student engine"] = engine.request   # what the preflight counts
    table, summary = student_answers(pool, cfg.student, model_uri=model_dir, engine=engine)
    losses, summary = student_losses(rows, cfg.student, model_uri=model_dir, engine=engine)
    engine.load(run.model_dir(2))      # the next round's weights move into the replicas
    engine.sleep()                     # student.colocate: training gets the GPU meanwhile
    engine.stop()

Stages reach it through Ray Data: ``map_batches`` over the pool with light tasks
(``call_engine``) on Ray's warm workers, each keeping a deployment handle per process and
sending a whole batch per call to the deployment's ``answer_rows`` / ``loss_rows``. Ray's own
``ServeDeploymentProcessorConfig`` sends every row as its own request to a streaming
method; a batch per call keeps the hf backend's batched generate and costs one round trip
per batch, and vLLM gets the batch's requests at once to batch continuously. The same
replicas answer the chat page and the OpenAI routes while the run goes on
(``serve.during_run``), so users watch the newest round learn.
"""

from __future__ import annotations

import socket
import uuid
from enum import StrEnum

import pyarrow as pa

from lion_ray.config import ServeConfig, StudentConfig, TrainConfig
from lion_ray.errors import LionError

DEPLOYMENT = "StudentServer"


class Method(StrEnum):
    """What the run asks of the deployment's replicas (``StudentServer``'s handle methods)."""

    MOVE_TO = "move_to"  # every replica: serve a model dir, awake
    SLEEP = "sleep"  # every replica: give the GPU to training
    ANSWER_ROWS = "answer_rows"  # a stage's batch: student answers
    LOSS_ROWS = "loss_rows"  # a stage's batch: losses on the teacher's answers


CLIENT_CPUS = 0.1  # a client only waits on its handle
# Colocated (student.colocate) on GPU: an engine takes just over half its GPU and a training
# worker the rest, so no two engines and no two workers ever share a GPU, and Ray's best-fit
# placement of fractional GPUs puts each worker beside an engine; the memory itself is
# handed over by the engine's sleep and the next load.
COLOCATED_ENGINE_GPU = 0.51
COLOCATED_WORKER_GPU = 1 - COLOCATED_ENGINE_GPU


class StudentEngine:
    """A handle on the run's student deployment (its app name, URL and settings)."""

    def __init__(self, app: str, url: str | None, student: StudentConfig, settings, first: str):
        self.app = app
        self.url = url
        self.student = student
        self.settings = settings
        self.first_model = first  # what the replicas start with (their constructor's)
        self.serving = first  # what they serve now
        self.replicas = settings.num_replicas
        self.owns_serve = False
        self.serve_id = ""  # one per start: tells a stage task that the engine is a new one
        self.record_uri: str | None = None  # what every replica serves: for restarted ones
        from lion_ray.engines.student.app import replicas_request

        self.request = replicas_request(settings)  # what its replicas hold while it runs

    @classmethod
    def start(
        cls,
        student: StudentConfig,
        model_dir: str,
        serve_cfg: ServeConfig | None = None,
        *,
        train: TrainConfig | None = None,
        app: str = "lion-run-student",
        http: bool = True,
        record_uri: str | None = None,
        held: dict | None = None,
    ) -> StudentEngine:
        """Deploy the student (``student.num_engines`` replicas of the serving deployment)
        serving ``model_dir``; with ``http``, on serve.host/port (a free port when that one
        is taken) under the serving rules (keys, loopback). ``record_uri``: where the engine
        records what its replicas serve after each load or sleep, so that a replica Serve
        restarts comes back on it (a replica's constructor arguments are fixed at deploy).
        ``held``: what the run's other engines hold, for the preflight."""
        from ray.serve.context import _get_global_client

        from lion_ray.engines.student.app import deploy

        # a Serve this run starts is this run's to stop (a later `lion-ray serve` on the
        # cluster must get its own address); one that was running stays
        serve_was_up = _get_global_client(raise_if_no_controller_running=False) is not None
        settings = engine_settings(student, serve_cfg or ServeConfig(), train)
        if http:
            settings = settings.model_copy(
                update={"port": _free_or_other(settings.host, settings.port)}
            )
        serve_id = uuid.uuid4().hex
        url = deploy(
            settings,
            student=student,
            model_dir=model_dir,
            name=app,
            route_prefix="/" if http else None,
            engine={"id": serve_id, "record": record_uri},
            held=held,
        )
        engine = cls(app, url, student, settings, model_dir)
        engine.owns_serve = not serve_was_up
        engine.serve_id = serve_id
        engine.record_uri = record_uri
        return engine

    def _broadcast(self, method: Method, *args) -> list[dict]:
        """``method`` on every replica at once (Serve's ``DeploymentHandle.broadcast``: no
        redeploy, so no replica restarts; a redeploy from Python gets a new code version
        and replaces every replica). Raises with each failed replica's cause."""
        from ray import serve

        handle = serve.get_deployment_handle(DEPLOYMENT, self.app)
        results = handle.broadcast(method.value, *args).results(
            timeout_s=600, return_exceptions=True
        )
        failed = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
        if failed or not results:
            detail = "; ".join(failed)[-3000:] or "no replica is running"
            raise LionError(f"the student engine could not {method.value}: {detail}")
        return results

    def load(self, model_dir: str) -> dict:
        """Move ``model_dir`` into every running replica; how it went (raises on failure, with
        the replica's cause)."""
        reports = self._broadcast(Method.MOVE_TO, model_dir)
        self.serving = model_dir
        self._record(asleep=False)
        return reports[0]

    def sleep(self) -> None:
        """Give the accelerators to training (student.colocate): every replica sleeps until
        the next load."""
        self._broadcast(Method.SLEEP)
        self._record(asleep=True)

    def _record(self, asleep: bool) -> None:
        # written once every replica has it: a replica restarted meanwhile may start on the
        # previous state, and the next stage's requests (which name their student) move it
        if self.record_uri:
            from lion_ray import storage

            storage.write_json(
                self.record_uri,
                {"engine": self.serve_id, "model_dir": self.serving, "asleep": asleep},
            )

    def map(self, ds, method: Method, blocks: int, max_length: int | None = None):
        """``ds`` through the deployment's ``method`` (answer_rows, loss_rows), a batch per
        call, a few calls per replica in flight; ``max_length``: loss_rows' (the tokens
        training learns)."""
        import ray

        return ds.map_batches(
            call_engine,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={
                "app": self.app,
                "method": Method(method),
                "serve_id": self.serve_id,
                "model_dir": self.serving,
                "max_length": max_length,
            },
            # tasks, not an actor pool: Ray's warm workers run them, each keeping its
            # handle (below), so a stage starts no process; the concurrency bounds the
            # batches in flight at the replicas
            compute=ray.data.TaskPoolStrategy(size=max(1, min(blocks, 4 * self.replicas))),
            num_cpus=CLIENT_CPUS,
        )

    def stop(self) -> None:
        from ray import serve

        if self.owns_serve:
            serve.shutdown()
        else:
            serve.delete(self.app)


# Deployment handles by (app, method), per worker process: made once, reused by every task
# (and every stage) that worker runs, while the Serve they were made under runs.
_HANDLES: dict[tuple[str, str], object] = {}
_HANDLES_SERVE: list[str] = [""]


def call_engine(
    batch: pa.Table,
    app: str,
    method: Method,
    serve_id: str = "",
    model_dir: str | None = None,
    max_length: int | None = None,
) -> pa.Table:
    """Ray Data task: one batch to the student deployment's ``method`` (answer_rows,
    loss_rows) for the student ``model_dir``; its rows come back with when the engine worked
    on them (``_t0``/``_t1``, the stage's compute time)."""
    from ray import serve

    from lion_ray.engines.student.rows import answers_table, loss_table, timed

    if serve_id != _HANDLES_SERVE[0]:
        # A warm worker outlives an engine: after one run in this process shut its Serve
        # down and the next started another, the handles and Serve's cached controller
        # client here would still name the dead one (Serve rechecks only on a new Ray job).
        from ray.serve.context import _disconnect

        _disconnect()
        _HANDLES.clear()
        _HANDLES_SERVE[0] = serve_id
    handle = _HANDLES.get((app, method))
    if handle is None:
        handle = getattr(serve.get_deployment_handle(DEPLOYMENT, app), method.value)
        _HANDLES[(app, method)] = handle
    rows = batch.to_pylist()
    if method is Method.ANSWER_ROWS:
        reply = handle.remote(rows, model_dir).result(timeout_s=3600)
        table = answers_table(rows, reply["outs"])
    elif method is Method.LOSS_ROWS:
        reply = handle.remote(rows, model_dir, max_length).result(timeout_s=3600)
        table = loss_table(rows, reply["losses"], reply["error"])
    else:
        raise ValueError(f"{method} is not a stage's batch method")
    return timed(table, reply["t0"], reply["t1"])


def engine_request(student: StudentConfig, serve_cfg: ServeConfig, train: TrainConfig | None):
    """What the run's engine holds while it lives (checked before Ray is asked)."""
    from lion_ray.engines.student.app import replicas_request

    return replicas_request(engine_settings(student, serve_cfg, train))


def engine_settings(
    student: StudentConfig, serve_cfg: ServeConfig, train: TrainConfig | None
) -> ServeConfig:
    """The serving settings of the run's engine: ``student.num_engines`` replicas with the
    student's resources (a colocated GPU share when it sleeps through training), room for
    the run's prompts and loss examples (as long as training's), no watcher (the run says
    when a round is done)."""
    if student.colocate and (student.vllm_on_gpu or student.gpus_per_engine):
        gpus = COLOCATED_ENGINE_GPU
    elif student.vllm_on_gpu:
        gpus = float(student.tensor_parallel_size)
    else:
        gpus = student.gpus_per_engine
    return serve_cfg.model_copy(
        update={
            "num_replicas": student.num_engines,
            "cpus_per_replica": student.cpus_per_engine,
            "gpus_per_replica": gpus,
            "max_prompt_tokens": max(serve_cfg.max_prompt_tokens, train.max_length if train else 0),
            "max_tokens_cap": max(serve_cfg.max_tokens_cap, student.max_new_tokens),
            "backend": student.backend,
            "watch_interval_s": 0.0,
        }
    )


def _free_or_other(host: str, port: int) -> int:
    """``port`` if nothing listens there, else a free one (another server, a second run)."""
    bind = "127.0.0.1" if host in ("0.0.0.0", "::", "localhost") else host
    with socket.socket() as s:
        try:
            s.bind((bind, port))
            return port
        except OSError:
            pass
    with socket.socket() as s:
        s.bind((bind, 0))
        return s.getsockname()[1]
