"""What a command needs at run time: Ray, the run directory and one engine per API role.

    with Session(cfg) as session:
        teacher = session.client("teacher")   # the same ApiEngine for every stage of the run

When any endpoint's base_url is 'sandbox', the session starts the sandbox server (with the
config's limits and faults) for its lifetime. Every command that spends against a run
directory (``lion-ray run``, ``answer``, ``discriminate``, ``generate``, ``eval``) goes
through a session, so its calls land in the run's response cache and spend ledger, and
count against the run's budget.
"""

from __future__ import annotations

import contextlib

from lion_ray import storage
from lion_ray.config import EndpointConfig, LionConfig
from lion_ray.engines.plan import STUDENT_ENGINE
from lion_ray.rundir import RunDir


class Session:
    def __init__(
        self,
        cfg: LionConfig,
        *,
        need_ray: bool = True,
        need_endpoints: bool = True,
        quiet: bool = False,
        show_progress: bool = True,
        log_file: str | None = None,
        student_engine=None,
        lazy: bool = False,
    ):
        """``student_engine``: a running ``StudentEngine`` to use instead of starting one
        (several runs in one process, a sweep): each run loads its own student into it, and
        it stays up after the run for its owner to stop. ``lazy``: Ray and the sandbox start
        at the first ``start()``, not on entering (a resumed run with nothing left to do
        starts neither)."""
        self.cfg = cfg
        self.lazy = lazy
        self.started = False
        self.need_ray = need_ray
        self.need_endpoints = need_endpoints
        self.quiet = quiet
        self.log_file = log_file
        self.show_progress = show_progress
        self.run = RunDir(cfg.storage.run_dir)
        self.sandbox = None
        self.dashboard_url: str | None = None
        self._clients: dict = {}
        self._stage = ""
        self._student = student_engine  # the run's student engine (student.engine: resident)
        self._student_given = student_engine is not None
        self._student_starting = None  # a Future: the engine starting in the background
        # What the session's long-lived engines hold while they live (holder -> Request): a
        # stage's request is checked against the cluster less these (engines.cluster.preflight)
        self.holdings: dict = {}
        self._pool_index = None
        if student_engine is not None:
            self.holdings[STUDENT_ENGINE] = student_engine.request

    def __enter__(self) -> Session:
        return self if self.lazy else self.start()

    def start(self) -> Session:
        """Start Ray (``need_ray``) and the sandbox (``need_endpoints``), once."""
        if self.started:
            return self
        self.started = True
        if self.need_ray:
            from lion_ray.engines.cluster import init_ray

            self.dashboard_url = init_ray(
                self.cfg.cluster,
                quiet=self.quiet,
                log_file=self.log_file if self.quiet else None,
            )
        if self.need_endpoints and any(e.is_sandbox for e in self.cfg.endpoints().values()):
            from lion_ray.sandbox.server import SandboxProcess, ServerOptions

            sb = self.cfg.sandbox
            options = ServerOptions(
                rpm=sb.rpm,
                tpm=sb.tpm,
                error_rate=sb.error_rate,
                latency_ms=sb.latency_ms,
                malformed_rate=sb.malformed_rate,
                teacher_error_rate=sb.teacher_error_rate,
            )
            self.sandbox = SandboxProcess(options, host=self._sandbox_host(), port=sb.port)
            self.sandbox.start()
        return self

    def _sandbox_host(self) -> str:
        """Loopback on one node; the node's address when other nodes must reach it."""
        host = self.cfg.sandbox.host
        if host != "auto":
            return host
        if self.need_ray:
            import ray

            if sum(1 for n in ray.nodes() if n["Alive"]) > 1:
                return ray.util.get_node_ip_address()
        return "127.0.0.1"

    def endpoint(self, role: str) -> EndpointConfig:
        ep = self.cfg.endpoints()[role]
        if ep.is_sandbox:
            return ep.model_copy(update={"base_url": self.sandbox.base_url})
        return ep

    def client(self, role: str):
        """The role's ``ApiEngine`` for this session (created on first use)."""
        if role not in self._clients:
            from lion_ray import storage
            from lion_ray.engines import ledger
            from lion_ray.engines.api import ApiEngine

            run = self.run
            legacy = 0.0
            if not storage.exists(run.ledger_dir(role)):  # a run from before the ledger
                legacy = ledger.legacy_spend(run.cache_dir(role), run.recorded_spend(role))
            self._clients[role] = ApiEngine(
                self.endpoint(role),
                role=role,
                cache_dir=run.cache_dir(role),
                ledger_dir=run.ledger_dir(role),
                batch_dir=run.batch_dir(role),
                legacy_usd=legacy,
                show_progress=self.show_progress,
                holdings=self.holdings,  # its workers live as long as this session
            )
            self._clients[role].stage = self._stage
        return self._clients[role]

    def quiet_logs(self) -> None:
        """Keep the libraries' messages in the run's log file: libraries imported since the
        last call (DeepSpeed, Serve) put their own console handlers up."""
        if self.quiet and self.log_file:
            from lion_ray.engines.cluster import log_to_file

            log_to_file(self.log_file)

    def prestart_student_engine(self, model: str) -> None:
        """Start the run's student engine in the background, serving ``model`` until a stage
        asks for another, so that its start (process, imports, weights; minutes for a vLLM
        engine on a GPU) overlaps the API and training stages before the first stage that
        needs it. Not with ``student.colocate``: a new engine would take the GPU memory
        that training is about to use."""
        student = self.cfg.student
        if student.engine != "resident" or student.colocate or self._student is not None:
            return
        if self._student_starting is None:
            from concurrent.futures import ThreadPoolExecutor

            starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="student-engine")
            self._student_starting = starter.submit(self._start_student, model)
            starter.shutdown(wait=False)  # the start goes on; the executor takes no more

    def _start_student(self, model: str):
        import hashlib

        from lion_ray.engines.student.engine import StudentEngine, engine_request

        cfg = self.cfg
        others = {k: v for k, v in self.holdings.items() if k != STUDENT_ENGINE}
        # held from the start: a stage that checks resources while the engine is still
        # starting (beside the run's first stages) counts it
        self.holdings[STUDENT_ENGINE] = engine_request(cfg.student, cfg.serve, cfg.train)
        try:
            return StudentEngine.start(
                cfg.student,
                model,
                cfg.serve,
                train=cfg.train,
                app="lion-run-" + hashlib.sha256(self.run.uri.encode()).hexdigest()[:8],
                http=cfg.serve.during_run,
                record_uri=self.run.path("student_engine.json"),
                held=others,
            )
        except BaseException:
            self.holdings.pop(STUDENT_ENGINE, None)
            raise

    def _started_student(self):
        """The engine a background start brought up (its error, if it failed)."""
        starting, self._student_starting = self._student_starting, None
        self._student = starting.result()

    def student_engine(self, model: str):
        """The run's one student engine, serving ``model``: started on first use (or
        before, by ``prestart_student_engine``), and a new round's weights moved into it
        after (a failed start or move raises, failing the stage). None with
        ``student.engine: per_stage``."""
        if self.cfg.student.engine != "resident":
            return None
        if self._student_starting is not None:
            self._started_student()
        if self._student is None:
            self._student = self._start_student(model)
        elif model != self._student.serving:
            self._student.load(model)
        return self._student

    @property
    def student_url(self) -> str | None:
        """Where the run's engine answers users (None before it is up, or without HTTP)."""
        return self._student.url if self._student is not None else None

    def student_sleeps(self) -> bool:
        """Before training, with student.colocate: the engine gives its GPU to Ray Train.
        True when an engine sleeps beside training (its share of each GPU stays reserved:
        each worker gets the rest of one engine's GPU); False when none is up yet (round 1:
        each worker asks a whole GPU, so that no two share one)."""
        if not self.cfg.student.colocate:
            return False
        if self._student_starting is not None:  # (not started in the background: colocated)
            self._started_student()
        if self._student is not None:
            self._student.sleep()
            return True
        return False

    def pool_index(self, loop):
        """The run's index of the Cache Pool for dedup, in a Ray actor (its memory grows
        with the pool; the driver's must not): made on first use, kept for the session."""
        if self._pool_index is None:
            from lion_ray.engines.dedup import PoolIndexActor

            self._pool_index = PoolIndexActor(
                loop.rouge_threshold,
                loop.similarity,
                local_files=storage.is_local(self.cfg.storage.run_dir),
            )
        return self._pool_index

    def take_api_wait_s(self) -> float:
        """Seconds the current stage waited on API answers (over all endpoints)."""
        return sum(engine.take_wait_s() for engine in self._clients.values())

    def bill_to(self, stage: str) -> None:
        """Name the stage that API calls from now on are recorded against in the ledger."""
        self._stage = stage
        for engine in self._clients.values():
            engine.stage = stage

    def __exit__(self, *exc) -> None:
        try:
            if self._student_starting is not None:  # no stage came to use it: stop it too
                with contextlib.suppress(Exception):
                    self._started_student()
            if self._student is not None and not self._student_given:
                self._student.stop()
                self.holdings.pop(STUDENT_ENGINE, None)
            failures = []
            for engine in self._clients.values():  # one that fails must not keep the others
                try:
                    engine.close()
                except Exception as error:
                    failures.append(error)
            if self._pool_index is not None:
                with contextlib.suppress(Exception):
                    self._pool_index.close()
            if failures:
                raise failures[0]
        finally:
            if self.sandbox is not None:
                self.sandbox.stop()
