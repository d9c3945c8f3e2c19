"""The run's one student engine: the Ray Serve deployment `lion-ray serve` runs, started once.

    engine = StudentEngine.start(cfg.student, model_dir, cfg.serve, train=cfg.train, app="lion-run")
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

import pyarrow as pa

from lion_ray.config import ServeConfig, StudentConfig, TrainConfig

DEPLOYMENT = "StudentServer"
CLIENT_CPUS = 0.1  # a client only waits on its handle
# Colocated (student.colocate) on GPU: the engine holds a sliver of its GPU and each training
# worker the rest, so Ray places one worker beside each engine and never two workers on
# one GPU; memory is handed over by the engine's sleep and the next load.
COLOCATED_ENGINE_GPU = 0.01
COLOCATED_WORKER_GPU = 1 - COLOCATED_ENGINE_GPU


class StudentEngine:
    """A handle on the run's student deployment (its app name, URL and settings)."""

    def __init__(self, app: str, url: str | None, student: StudentConfig, replicas: int):
        self.app = app
        self.url = url
        self.student = student
        self.replicas = replicas

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
        gpus: float | None = None,
    ) -> StudentEngine:
        """Deploy the student (``student.num_engines`` replicas of the serving deployment)
        serving ``model_dir``; with ``http``, on serve.host/port (a free port when that one
        is taken) under the serving rules (keys, loopback)."""
        from lion_ray.engines import cluster
        from lion_ray.engines.serving import deploy

        serve_cfg = serve_cfg or ServeConfig()
        on_gpu = student.backend == "vllm" and student.vllm_device == "gpu"
        if gpus is None:
            if student.colocate and (on_gpu or student.gpus_per_engine):
                gpus = COLOCATED_ENGINE_GPU
            elif on_gpu:
                gpus = float(student.tensor_parallel_size)
            else:
                gpus = student.gpus_per_engine
        # the run's prompts and the loss examples (as long as training's) must fit
        longest = max(serve_cfg.max_prompt_tokens, train.max_length if train else 0)
        settings = serve_cfg.model_copy(
            update={
                "num_replicas": student.num_engines,
                "cpus_per_replica": student.cpus_per_engine,
                "gpus_per_replica": gpus,
                "max_prompt_tokens": longest,
                "max_tokens_cap": max(serve_cfg.max_tokens_cap, student.max_new_tokens),
                "backend": student.backend,
                "watch_interval_s": 0.0,  # the run tells it when a round is done
                "port": _free_or_other(serve_cfg.host, serve_cfg.port) if http else 1,
            }
        )
        url = deploy(
            settings,
            student=student,
            model_dir=model_dir,
            name=app,
            route_prefix="/" if http else None,
        )
        cluster.HELD["the student engine"] = {
            "CPU": settings.cpus_per_replica * settings.num_replicas,
            "GPU": settings.gpus_per_replica * settings.num_replicas,
        }
        return cls(app, url, student, settings.num_replicas)

    def _call(self, method: str, *args, timeout_s: float = 3600):
        from ray import serve

        handle = serve.get_deployment_handle(DEPLOYMENT, self.app)
        return getattr(handle, method).remote(*args).result(timeout_s=timeout_s)

    def load(self, model_dir: str) -> dict:
        """Move ``model_dir`` into the running replicas; how it went (raises on failure,
        with the replica's cause)."""
        return self._call("load", model_dir)

    def sleep(self) -> None:
        """Give the accelerator to training (student.colocate)."""
        self._call("sleep")

    def map(self, ds, method: str, blocks: int):
        """``ds`` through the deployment's ``method`` (answer_rows, loss_rows), a batch per
        call, a few calls per replica in flight."""
        import ray

        return ds.map_batches(
            call_engine,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"app": self.app, "method": method},
            # tasks, not an actor pool: Ray's warm workers run them, each keeping its
            # handle (below), so a stage starts no process; the concurrency bounds the
            # batches in flight at the replicas
            compute=ray.data.TaskPoolStrategy(size=max(1, min(blocks, 4 * self.replicas))),
            num_cpus=CLIENT_CPUS,
        )

    def stop(self) -> None:
        from ray import serve

        from lion_ray.engines import cluster

        try:
            serve.delete(self.app)
        finally:
            cluster.HELD.pop("the student engine", None)


# Deployment handles by (app, method), per worker process: made once, reused by every task
# (and every stage) that worker runs.
_HANDLES: dict[tuple[str, str], object] = {}


def call_engine(batch: pa.Table, app: str, method: str) -> pa.Table:
    """Ray Data task: one batch to the student deployment's ``method`` (answer_rows,
    loss_rows); its rows come back with when the engine worked on them (``_t0``/``_t1``,
    the stage's compute time)."""
    from ray import serve

    from lion_ray.engines.inference import LOSS_SCHEMA, answer_rows_table

    handle = _HANDLES.get((app, method))
    if handle is None:
        handle = getattr(serve.get_deployment_handle(DEPLOYMENT, app), method)
        _HANDLES[(app, method)] = handle
    rows = batch.to_pylist()
    reply = handle.remote(rows).result(timeout_s=3600)
    if method == "answer_rows":
        table = answer_rows_table(rows, reply["outs"])
    else:
        table = pa.Table.from_pylist(
            [
                {"id": r["id"], "loss": x, "error": reply["error"]}
                for r, x in zip(rows, reply["losses"], strict=True)
            ],
            schema=LOSS_SCHEMA,
        )
    n = table.num_rows
    return table.append_column("_t0", pa.array([reply["t0"]] * n)).append_column(
        "_t1", pa.array([reply["t1"]] * n)
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
