"""The Lion loop as one job: rounds of imitation -> discrimination -> generation -> pools.

    lion-ray run --config configs/demo.yaml
    ray job submit --working-dir . -- python jobs/distill.py --config configs/demo.yaml

A round is a list of ``Stage``s, each naming the files it reads and writes in the run
directory. A stage runs unless the manifest records it with the same input fingerprints
and its outputs exist; when a stage is (re)done, every recorded stage that read its
outputs is forgotten, so it is redone too when the walk reaches it. API stages are
answered from the response cache, training resumes from its latest checkpoint, inference
and generation are deterministic: a driver killed at any point finishes, when rerun, with
the same pools, and spends nothing twice.
"""

from __future__ import annotations

import json
import logging
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from rich import box
from rich.console import Console
from rich.table import Table

from lion_ray import storage
from lion_ray.config import LionConfig, dump_config, parse_config
from lion_ray.errors import LionError, OutputRejected, user_error
from lion_ray.logic.chat import merge_usage
from lion_ray.logic.pools import (
    ANSWER_SCHEMA,
    POOL_SCHEMA,
    ImportStats,
    import_records,
    load_pool_bytes,
)
from lion_ray.progress import make_console
from lion_ray.rundir import ApiUsage, RunDir, StageInput, StageRecord
from lion_ray.session import Session

TRACE = logging.getLogger("lion_ray.trace")  # a failed stage's traceback: the run's log file

HELDOUT_SEED_OFFSET = 10_000  # held-out tasks come from a seed the seed pool never uses
# the round's stages that ask the student engine
ENGINE_STAGES = {
    "discrimination.student",
    "discrimination.student_loss",
    "discrimination.learnability",
    "eval.heldout",
}


@dataclass
class StageIO:
    """What a stage function is handed: its record key, round and resolved paths."""

    key: str
    round: int | None
    inputs: dict[str, str]
    outputs: dict[str, str]
    fingerprints: dict[str, str] = field(default_factory=dict)  # of the inputs, as recorded


@dataclass
class StageResult:
    rows: int = 0
    failed: int = 0
    api: dict[str, dict] = field(default_factory=dict)  # role -> usage
    metrics: dict = field(default_factory=dict)
    compute_s: float | None = None  # wall time an engine computed (model, dedup); None: none


@dataclass
class Stage:
    """One step of the loop: what it reads, what it writes, and the function that does it."""

    name: str  # e.g. "imitation.teacher"; recorded as "round_<r>/<name>"
    work: Callable[[StageIO], StageResult]
    inputs: dict[str, str]
    outputs: dict[str, str]


class Driver:
    def __init__(
        self,
        cfg: LionConfig,
        session: Session,
        console: Console | None = None,
        show_progress: bool = True,
    ):
        self.cfg = cfg
        self.session = session
        self.run: RunDir = session.run
        self.console = console or make_console()
        self.show_progress = show_progress
        self.engines_started = False

    # --- the loop -----------------------------------------------------------------------

    def run_all(self) -> list[dict]:
        from lion_ray.report import collect, round_summary, write_report
        from lion_ray.status import generation_line

        self.check_config()
        self.run_stages(None, self.setup_stages())
        model = self.cfg.student.model_path or self.run.path("student_init")
        summaries = []
        for r in range(1, self.cfg.loop.rounds + 1):
            stages = self.round_stages(r, model)
            done = self.run.manifest.stages
            if any(s.name in ENGINE_STAGES and f"round_{r}/{s.name}" not in done for s in stages):
                # up while the round's API and training stages run, not after them
                self.start_engines()
                self.session.prestart_student_engine(model)
            self.run_stages(r, stages)
            model = self.run.model_dir(r)
            if r == self.cfg.loop.rounds:
                self.run.manifest.set_skipped(self.skipped_stages())
            report_uri = write_report(self.run, r, self.cfg.name)
            summary = round_summary(collect(self.run, r)["rounds"][-1])
            summaries.append(summary)
            self.console.print(summary_table([summary], title=f"round {r} done"))
            generated = self.run.manifest.stages.get(f"round_{r}/generation")
            if generated and "candidates" in generated.metrics:
                self.console.print(generation_line(generated.metrics), highlight=False)
            self.console.print(f"report: {report_uri}")
        self.run.manifest.set_finished(self.cfg.loop.rounds)
        return summaries

    def setup_stages(self) -> list[Stage]:
        run, cfg = self.run, self.cfg
        stages = []
        if not cfg.student.model_path:
            stages.append(
                Stage("setup.student", self.build_student, {}, {"model": run.path("student_init")})
            )
        seed_inputs = {} if cfg.loop.seed_pool == "sandbox" else {"seeds": cfg.loop.seed_pool}
        stages.append(
            Stage(
                "round_1/pools.seed",
                self.seed_pools,
                seed_inputs,
                {"train": run.pool(1, "train"), "cache": run.pool(1, "cache")},
            )
        )
        if self.heldout_enabled:
            stages.append(
                Stage(
                    "setup.heldout",
                    self.heldout_tasks,
                    {"cache_pool": run.pool(1, "cache")},
                    {"tasks": run.path("heldout.jsonl")},
                )
            )
        return stages

    def round_stages(self, r: int, base_model: str) -> list[Stage]:
        """One round, top to bottom. The last round of the run trains and scores only: its
        discrimination and generation would feed a round that does not come (a third of
        the referee's and generator's spend in a 3-round run); extended with more rounds,
        the run runs them then."""
        stages = self.full_round(r, base_model)
        if r < self.cfg.loop.rounds or self.cfg.loop.last_round_generates:
            return stages
        return [s for s in stages if s.name not in self.feeds_next_round(stages)]

    @staticmethod
    def feeds_next_round(stages: list[Stage]) -> list[str]:
        return [
            s.name
            for s in stages
            if s.name.startswith("discrimination.") or s.name in ("generation", "pools")
        ]

    def skipped_stages(self) -> dict[str, str]:
        """The last round's stages this run leaves out, and why."""
        r = self.cfg.loop.rounds
        if self.cfg.loop.last_round_generates:
            return {}
        names = self.feeds_next_round(self.full_round(r, self.run.model_dir(r)))
        why = (
            f"round {r} is the run's last: its discrimination and generation would only feed "
            f"round {r + 1}; extend the run (--set loop.rounds={r + 1}) to run them"
        )
        return {f"round_{r}/{name}": why for name in names}

    def full_round(self, r: int, base_model: str) -> list[Stage]:
        """Every stage of round ``r``, as a round that another follows runs them."""
        run = self.run
        train_pool, cache_pool = run.pool(r, "train"), run.pool(r, "cache")
        model = run.model_dir(r)
        teacher_train = run.round_path(r, "imitation", "teacher.parquet")
        teacher_cache = run.round_path(r, "discrimination", "teacher.parquet")
        student_cache = run.round_path(r, "discrimination", "student.parquet")
        judged = run.round_path(r, "discrimination", "judged.parquet")
        # selection 'learnability' reads each instruction's loss one round earlier
        judged_before = run.round_path(r - 1, "discrimination", "judged.parquet") if r > 1 else None
        new = run.round_path(r, "generation", "new.parquet")
        return [
            # 1. imitation: the teacher answers the Train Pool, the student is fine-tuned on it
            Stage(
                "imitation.teacher",
                self.teacher_answers,
                {"pool": train_pool},
                {"answers": teacher_train},
            ),
            Stage(
                "imitation.train",
                self.fine_tune,
                {"answers": teacher_train, "base_model": base_model},
                {"model": model},
            ),
            # 2. discrimination: which Cache Pool instructions does the student still fail?
            *self.discrimination_stages(
                cache_pool, model, judged, teacher_cache, student_cache, judged_before
            ),
            # the held-out score of this round's student (sandbox runs), beside discrimination
            *(
                [
                    Stage(
                        "eval.heldout",
                        self.heldout_eval,
                        {"tasks": run.path("heldout.jsonl"), "model": model},
                        {"answers": run.round_path(r, "eval", "heldout.parquet")},
                    )
                ]
                if self.heldout_enabled
                else []
            ),
            # 3. generation: new instructions from the hard and the easy ones
            Stage(
                "generation",
                self.generation,
                {"judged": judged, "cache_pool": cache_pool},
                {"new": new, "candidates": run.round_path(r, "generation", "candidates.parquet")},
            ),
            # 4. the next round's pools
            Stage(
                "pools",
                self.next_pools,
                {"train_pool": train_pool, "cache_pool": cache_pool, "new": new},
                {"train": run.pool(r + 1, "train"), "cache": run.pool(r + 1, "cache")},
            ),
        ]

    def discrimination_stages(
        self, cache_pool, model, judged, teacher_cache, student_cache, judged_before=None
    ):
        """The stages of ``loop.selection``; each writes the judged Cache Pool."""
        selection = self.cfg.loop.selection
        if selection == "random":  # the control arm: no labels, nothing asked
            return [
                Stage(
                    "discrimination.random",
                    self.unlabelled,
                    {"pool": cache_pool},
                    {"judged": judged},
                )
            ]
        teacher = Stage(
            "discrimination.teacher",
            self.teacher_answers,
            {"pool": cache_pool},
            {"answers": teacher_cache},
        )
        if selection == "student_loss":  # the student's loss on the teacher's answer
            return [
                teacher,
                Stage(
                    "discrimination.student_loss",
                    self.loss_split,
                    {"pool": cache_pool, "teacher": teacher_cache, "model": model},
                    {"judged": judged},
                ),
            ]
        if selection == "learnability":  # that loss, weighed by how fast it is falling
            before = {"judged_before": judged_before} if judged_before else {}
            return [
                teacher,
                Stage(
                    "discrimination.learnability",
                    self.loss_split,
                    {"pool": cache_pool, "teacher": teacher_cache, "model": model} | before,
                    {"judged": judged},
                ),
            ]
        # the paper's: the student answers too, the referee scores both orders
        return [
            teacher,
            Stage(
                "discrimination.student",
                self.student_answers,
                {"pool": cache_pool, "model": model},
                {"answers": student_cache},
            ),
            Stage(
                "discrimination.referee",
                self.referee,
                {"pool": cache_pool, "teacher": teacher_cache, "student": student_cache},
                {"judged": judged},
            ),
        ]

    # --- bookkeeping ----------------------------------------------------------------------

    def run_stages(self, r: int | None, stages: list[Stage]) -> None:
        """Walk ``stages`` in order (setup stages when ``r`` is None)."""
        for stage in stages:
            self.run_stage(stage.name if r is None else f"round_{r}/{stage.name}", r, stage)

    def run_stage(self, key: str, r: int | None, stage: Stage) -> StageRecord:
        """Run ``stage`` unless it is recorded with the inputs it has now and its outputs exist."""
        run, manifest = self.run, self.run.manifest
        inputs = {
            name: StageInput(uri=run.relative(uri), fingerprint=run.fingerprint(uri))
            for name, uri in stage.inputs.items()
        }
        outputs = {name: run.relative(uri) for name, uri in stage.outputs.items()}
        rec = manifest.get(key)
        why = ""
        if rec is not None and all(storage.exists(u) for u in stage.outputs.values()):
            if rec.inputs is None:  # recorded by lion-ray 0.1.0: trusted, fingerprinted from now on
                rec = rec.model_copy(update={"inputs": inputs, "outputs": outputs})
                manifest.record(rec)
                return rec
            changed = [
                name
                for name, now in inputs.items()
                if name not in rec.inputs or rec.inputs[name].fingerprint != now.fingerprint
            ]
            if not changed:
                return rec
            why = f" (changed: {', '.join(changed)})"
        elif rec is not None:
            why = " (an output is missing)"
        self.start_engines()
        manifest.set_current(key)
        self.console.print(f"[bold cyan]>[/bold cyan] {key}{why}")
        self.session.bill_to(key)
        self.session.quiet_logs()
        self.session.take_api_wait_s()  # from here on, waits count for this stage
        started = time.monotonic()
        try:
            prints = {name: i.fingerprint for name, i in inputs.items()}
            result = stage.work(StageIO(key, r, dict(stage.inputs), dict(stage.outputs), prints))
        except Exception as exc:  # recorded (status shows it), then raised: a rerun retries
            cause = user_error(exc)
            shown = cause or exc
            manifest.record_failure(key, f"{type(shown).__name__}: {shown}")
            if cause is None:
                raise  # a bug: its traceback is the report
            # the console gets the cause and its fix in one line; the run's log the rest
            TRACE.error("%s failed:\n%s", key, "".join(traceback.format_exception(exc)))
            raise cause from None
        rec = StageRecord(
            key=key,
            inputs=inputs,
            outputs=outputs,
            rows=result.rows,
            failed=result.failed,
            api={role: ApiUsage.model_validate(u) for role, u in result.api.items() if u},
            metrics=result.metrics,
            seconds=round(time.monotonic() - started, 2),
            compute_s=None if result.compute_s is None else round(result.compute_s, 2),
            api_wait_s=round(self.session.take_api_wait_s(), 2),
        )
        # whatever read this stage's outputs was computed from the old ones: redo it too
        produced = set(outputs.values())
        stale = [
            k
            for k, other in manifest.stages.items()
            if k != key and other.inputs and any(i.uri in produced for i in other.inputs.values())
        ]
        if stale:
            self.console.print(
                f"  {key} was redone, so these will be too: {', '.join(sorted(stale))}"
            )
            manifest.forget(stale)
        manifest.record(rec)
        return rec

    def check_config(self) -> None:
        """A run directory belongs to one config: resuming with another would mix results."""
        uri = self.run.path("config.yaml")
        ours = _results_config(self.cfg)
        if storage.exists(uri):
            recorded = parse_config(storage.read_text(uri), uri)
            theirs = _results_config(recorded)
            if theirs != ours:
                diffs = sorted(_diff(theirs, ours))
                raise LionError(
                    f"{self.run.uri} was started with a different config ({', '.join(diffs[:6])}); "
                    "rerun with the same config to resume, or set storage.run_dir to a new directory"
                )
            if recorded.loop.rounds != self.cfg.loop.rounds:  # a run extended (or cut short)
                loop = recorded.loop.model_copy(update={"rounds": self.cfg.loop.rounds})
                storage.write_text(uri, dump_config(recorded.model_copy(update={"loop": loop})))
        else:
            storage.write_text(uri, dump_config(self.cfg))

    def start_engines(self) -> None:
        """Ray and the sandbox, and the check that the cluster can hold the run's engines:
        once, before the first stage with work to do, so that a run with nothing left to do
        (run again for its report, or after its last stage) starts none of them."""
        if self.engines_started:
            return
        self.engines_started = True
        up = self.session.started
        self.session.start()
        if self.session.dashboard_url and not up:
            self.console.print(f"Ray dashboard: {self.session.dashboard_url}")
        self.check_resources()

    def check_resources(self) -> None:
        """Refuse a run whose stages ask for more than the cluster can ever give them, now,
        not when the stage comes (each engine checks again before it asks Ray, and waits
        there for nodes the autoscaler is adding). The autoscaler is asked for the run's
        largest step, the last of the plan."""
        from lion_ray.engines.cluster import ask_autoscaler, preflight
        from lion_ray.engines.plan import run_plan

        steps = run_plan(self.cfg)
        scales = [preflight(step.request, step.held, wait=False) for step in steps]
        if any(scales):  # nodes to come: ask for them now, while the first stages run
            ask_autoscaler([steps[-1].request, *steps[-1].held.values()])

    @property
    def heldout_enabled(self) -> bool:
        return self.cfg.loop.seed_pool == "sandbox" and bool(self.cfg.sandbox.heldout_tasks)

    def student_engine(self, model: str):
        """The run's student engine serving ``model`` (None with engine: per_stage); its
        address is printed when it starts serving users."""
        had = self.session.student_url
        engine = self.session.student_engine(model)
        if engine is not None and engine.url and not had:
            self.console.print(
                f"student endpoint: {engine.url}/v1 (OpenAI API) and {engine.url}/ (chat "
                "page): the newest round's student, while the run goes on"
            )
        return engine

    # --- setup stages ---------------------------------------------------------------------

    def build_student(self, io: StageIO) -> StageResult:
        from lion_ray.student import init_student

        info = init_student(io.outputs["model"], self.cfg.student.tiny)
        return StageResult(metrics=info)

    def seed_pools(self, io: StageIO) -> StageResult:
        loop, sb = self.cfg.loop, self.cfg.sandbox
        if loop.seed_pool == "sandbox":
            from lion_ray.sandbox.tasks import generate_tasks

            tasks = generate_tasks(
                sb.seed_tasks, seed=sb.task_seed, max_difficulty=sb.max_difficulty
            )
            pool, stats = import_records(
                [(t.as_record(), f"sandbox:{i}") for i, t in enumerate(tasks)], source="sandbox"
            )
        else:
            if not storage.exists(loop.seed_pool):
                raise LionError(f"loop.seed_pool: {loop.seed_pool} does not exist")
            if is_pool_file(loop.seed_pool):  # a lion-ray pool: copied a window at a time
                rows = 0
                for out in ("train", "cache"):
                    rows = append_pool(
                        io.outputs[out],
                        loop.seed_pool,
                        POOL_SCHEMA.empty_table(),
                        self.cfg.storage.window_rows,
                    )
                stats = ImportStats(records=rows, imported=rows)
                return StageResult(rows=rows, metrics={"import": stats.as_dict()})
            pool, stats = load_pool_bytes(storage.read_bytes(loop.seed_pool), loop.seed_pool)
        storage.write_parquet(io.outputs["train"], pool)
        storage.write_parquet(io.outputs["cache"], pool)
        return StageResult(rows=pool.num_rows, metrics={"import": stats.as_dict()})

    def heldout_tasks(self, io: StageIO) -> StageResult:
        """Held-out sandbox tasks (with answers), disjoint from the seed pool."""
        from lion_ray.sandbox.tasks import FAMILIES, generate_tasks, stratified_tasks

        sb = self.cfg.sandbox
        from lion_ray.logic.pools import TextHashes

        windows = storage.iter_windows(
            io.inputs["cache_pool"], self.cfg.storage.window_rows, ["instruction"]
        )
        seen = TextHashes(w.column("instruction").to_pylist() for w in windows)
        if sb.heldout_distribution == "target":
            # what generation can reach: one level up per round from the seed pool's hardest
            top = min(5, sb.max_difficulty + self.cfg.loop.rounds - 1)
            per_cell = max(1, -(-sb.heldout_tasks // (len(FAMILIES) * top)))
            tasks = stratified_tasks(per_cell, sb.task_seed + HELDOUT_SEED_OFFSET, top, seen)
            random.Random(sb.task_seed).shuffle(tasks)  # a cut keeps every cell about equal
        else:
            tasks = [
                t
                for t in generate_tasks(
                    sb.heldout_tasks * 2,
                    seed=sb.task_seed + HELDOUT_SEED_OFFSET,
                    max_difficulty=sb.max_difficulty,
                )
                if t.instruction not in seen
            ]
        records = [t.as_record() for t in tasks[: sb.heldout_tasks]]
        storage.write_text(io.outputs["tasks"], "".join(json.dumps(r) + "\n" for r in records))
        return StageResult(rows=len(records))

    # --- round stages -----------------------------------------------------------------------

    def windowed(self, io: StageIO, output: str, inputs: list[str], work, schema=None, check=None):
        """Run ``work(i, windows, *tables) -> (table, info)`` over the stage's ``inputs`` a
        window of storage.window_rows rows at a time (the inputs row-aligned: the same rows
        in the same order), each result a part of ``output``, so memory is one window and a
        killed stage keeps the windows it finished. ``check(infos, parts)`` judges the whole
        output (every window's info; a function that yields its parts) before it is written.
        An ``OutputRejected`` from either drops the parts: a rerun redoes them after the fix
        instead of reusing what failed. Returns (rows, every window's info)."""
        rows_per = self.cfg.storage.window_rows
        # every input of the stage, not only the streamed ones: a student's parts answered
        # by an earlier model (a redone imitation.train) must not be reused
        plan = {
            "window_rows": rows_per,
            "inputs": {name: io.fingerprints.get(name, uri) for name, uri in io.inputs.items()},
        }
        out = storage.WindowedOutput(io.outputs[output], plan, schema)
        windows = -(-storage.count_rows(io.inputs[inputs[0]]) // rows_per)
        streams = [storage.iter_windows(io.inputs[name], rows_per) for name in inputs]
        try:
            for i, tables in enumerate(zip(*streams, strict=True)):
                if not out.done(i):
                    _check_aligned(io.key, i, dict(zip(inputs, tables, strict=True)))
                    table, info = work(i, windows, *tables)
                    out.write(i, table, info)
            if check is not None:
                check(out.infos(windows), lambda: out.tables(windows))
        except OutputRejected:
            out.discard()
            raise
        return out.finish(windows)

    def teacher_answers(self, io: StageIO) -> StageResult:
        """The teacher answers a pool (Train or Cache Pool), from the cache where it can, a
        window at a time."""
        from lion_ray.imitation import teacher_answers

        client = self.session.client("teacher")

        def answer(i: int, windows: int, pool):
            return teacher_answers(pool, client, label=_window_label(io.key, i, windows))

        rows, infos = self.windowed(io, "answers", ["pool"], answer, ANSWER_SCHEMA)
        used = merge_usage(*infos)
        return StageResult(rows=rows, failed=used.get("failed", 0), api={"teacher": used})

    def fine_tune(self, io: StageIO) -> StageResult:
        from lion_ray.engines.training import train_student

        # colocated: Ray Train gets the engine's GPUs, a worker beside each sleeping engine
        beside_engine = self.session.student_sleeps()
        model_uri = io.outputs["model"]
        metrics = train_student(
            io.inputs["answers"],  # read a window at a time, each rank's rows put apart
            self.cfg.train,
            base_model=io.inputs["base_model"],
            out_uri=model_uri,
            storage_path=model_uri.rsplit("/", 1)[0],  # Ray Train checkpoints beside the model
            name="train",
            student=self.cfg.student,
            show_progress=self.show_progress,
            beside_engine=beside_engine,
            held=self.session.holdings,
            window_rows=self.cfg.storage.window_rows,
        )
        return StageResult(
            rows=metrics["rows"],
            failed=metrics["skipped_failed_rows"],
            metrics=metrics,
            compute_s=metrics["train_s"],  # the training loop; the rest is start-up and export
        )

    def student_answers(self, io: StageIO) -> StageResult:
        """The student answers a pool through the run's engine, a window at a time; too many
        failed rows (student.max_failed_fraction of the stage's) fail it."""
        from lion_ray.engines.inference import check_failures, merge_summaries, student_answers

        engine = self.student_engine(io.inputs["model"])
        total = storage.count_rows(io.inputs["pool"])
        failed = [0]

        def answer(i: int, windows: int, pool):
            table, summary = student_answers(
                pool,
                self.cfg.student,
                model_uri=io.inputs["model"],
                label=_window_label(io.key, i, windows),
                show_progress=self.show_progress,
                engine=engine,
                check=False,  # the stage's share is checked, not each window's
            )
            failed[0] += summary["failed"]
            if failed[0] > self.cfg.student.max_failed_fraction * total:  # cannot pass now
                check_failures(io.key, total, failed[0], summary["first_error"], self.cfg.student)
            return table, summary

        def check(infos: list[dict], _parts) -> None:
            # the whole stage's share, windows of a killed earlier attempt included
            summary = merge_summaries(infos)
            check_failures(io.key, total, summary["failed"], summary["first_error"], student)

        student = self.cfg.student
        rows, summaries = self.windowed(io, "answers", ["pool"], answer, ANSWER_SCHEMA, check)
        summary = merge_summaries(summaries)
        return StageResult(
            rows=rows,
            failed=summary["failed"],
            metrics=summary | {"served_model": self.run.relative(io.inputs["model"])},
            compute_s=summary["compute_s"],
        )

    def referee(self, io: StageIO) -> StageResult:
        """The referee judges each pair in both orders, a window at a time; a referee that
        leaves too many pairs without a readable score fails the stage."""
        from lion_ray.discrimination import (
            JUDGED_SCHEMA,
            check_reviews,
            judge,
            judged_metrics,
            pair_answers,
        )

        client, loop = self.session.client("referee"), self.cfg.loop

        def judge_window(i: int, windows: int, pool, teacher, student):
            judged, info = judge(
                pair_answers(pool, teacher, student),
                client,
                tau=loop.tau,
                max_reasks=loop.referee_max_reasks,
                structured=self.cfg.referee.structured_output,
                label=_window_label(io.key, i, windows),
            )
            return judged, info["api"]

        def check(_infos, parts) -> None:
            check_reviews(parts(), self.cfg.referee.model, loop.referee_max_unparsed_fraction)

        uri = io.outputs["judged"]
        rows, used = self.windowed(
            io, "judged", ["pool", "teacher", "student"], judge_window, JUDGED_SCHEMA, check
        )
        m = judged_metrics(storage.iter_windows(uri, self.cfg.storage.window_rows))
        return StageResult(
            rows=rows,
            failed=m["failed"] + m["unparsed"],
            api={"referee": merge_usage(*used)},
            metrics=m,
        )

    def loss_split(self, io: StageIO) -> StageResult:
        """The student's loss on each teacher answer (a window at a time), then the split
        over all of them (ids and losses only), then the judged table a window at a time."""
        from lion_ray.discrimination import JUDGED_SCHEMA, LossSplit, pair_answers, scored_losses
        from lion_ray.engines.inference import check_failures, student_losses

        rows_per = self.cfg.storage.window_rows
        engine = self.student_engine(io.inputs["model"])

        def pairs():
            pools = storage.iter_windows(io.inputs["pool"], rows_per)
            teachers = storage.iter_windows(io.inputs["teacher"], rows_per)
            for pool, teacher in zip(pools, teachers, strict=True):
                yield pair_answers(pool, teacher, None)

        losses: dict[str, float | None] = {}
        summaries: list[dict] = []
        total, failed, first_error = storage.count_rows(io.inputs["pool"]), 0, ""
        for window in pairs():
            scorable = [
                {k: r[k] for k in ("id", "instruction", "input")} | {"answer": r["teacher_answer"]}
                for r in window.to_pylist()
                if not r["upstream_error"]
            ]
            got, summary = student_losses(
                scorable,
                self.cfg.student,
                model_uri=io.inputs["model"],
                max_length=self.cfg.train.max_length,
                label=io.key,
                show_progress=self.show_progress,
                engine=engine,
                check=False,  # the stage's share is checked, not each window's
            )
            losses.update(got)
            summaries.append(summary)
            failed, first_error = failed + summary["failed"], first_error or summary["first_error"]
            if failed > self.cfg.student.max_failed_fraction * total:  # cannot pass now
                check_failures(io.key, total, failed, first_error, self.cfg.student)
        scored = sum(s["rows"] for s in summaries)
        check_failures(io.key, scored, failed, first_error, self.cfg.student)
        previous = None
        if self.cfg.loop.selection == "learnability":
            previous = {}
            before = io.inputs.get("judged_before")
            if before and "student_loss" in storage.read_schema(before).names:
                for window in storage.iter_windows(before, rows_per, ["id", "student_loss"]):
                    ids, old = window.column("id").to_pylist(), window.column("student_loss")
                    previous.update(zip(ids, old.to_pylist(), strict=True))
        split = LossSplit(scored_losses(pairs(), losses), self.cfg.loop.hard_fraction, previous)
        with storage.parquet_writer(io.outputs["judged"], JUDGED_SCHEMA) as write:
            for window in pairs():
                write(split.rows(window))
        m = split.metrics | {
            "scoring_s": round(sum(x["wall_s"] for x in summaries), 2),
            "scoring_errors": sorted({e for x in summaries for e in x["errors"]})[:3],
        }
        m["served_model"] = self.run.relative(io.inputs["model"])
        computed = [x["compute_s"] for x in summaries if x.get("compute_s") is not None]
        return StageResult(
            rows=len(split.scored),
            failed=m["failed"],
            metrics=m,
            compute_s=round(sum(computed), 2) if computed else None,
        )

    def unlabelled(self, io: StageIO) -> StageResult:
        from lion_ray.discrimination import JUDGED_SCHEMA, unjudged

        rows = 0
        with storage.parquet_writer(io.outputs["judged"], JUDGED_SCHEMA) as write:
            for pool in storage.iter_windows(io.inputs["pool"], self.cfg.storage.window_rows):
                judged, _ = unjudged(pool)
                write(judged)
                rows += judged.num_rows
        zero = dict.fromkeys(("judged", "hard", "easy", "unparsed", "failed"), 0)
        return StageResult(rows=rows, metrics={"rows": rows} | zero)

    def heldout_eval(self, io: StageIO) -> StageResult:
        from lion_ray.engines.inference import student_answers
        from lion_ray.sandbox.tasks import heldout_accuracy

        tasks = [json.loads(line) for line in storage.read_text(io.inputs["tasks"]).splitlines()]
        pool = import_records([(t, "heldout") for t in tasks], source="heldout")[0]
        table, summary = student_answers(
            pool,
            self.cfg.student,
            model_uri=io.inputs["model"],
            label=io.key,
            show_progress=self.show_progress,
            engine=self.student_engine(io.inputs["model"]),
        )
        storage.write_parquet(io.outputs["answers"], table)
        answers = dict(
            zip(
                table.column("instruction").to_pylist(),
                table.column("answer").to_pylist(),
                strict=True,
            )
        )
        return StageResult(
            rows=table.num_rows,
            metrics=heldout_accuracy(tasks, answers)
            | {"served_model": self.run.relative(io.inputs["model"]), "engine": summary["engine"]},
            compute_s=summary["compute_s"],
        )

    def generation(self, io: StageIO) -> StageResult:
        """New instructions from the judged Cache Pool's parents, checked against the
        run's index of the Cache Pool (kept between rounds, grown by each round's new
        instructions); only ids, labels and the drawn parents' texts are read here."""
        from lion_ray.engines.dedup import IndexLost
        from lion_ray.generation import check_candidates, generate

        rows_per = self.cfg.storage.window_rows
        columns = ["id", "status", "label", "instruction", "input"]
        for attempt in (1, 2):
            try:
                new, candidates, info = generate(
                    lambda: storage.iter_windows(io.inputs["judged"], rows_per, columns),
                    self.pool_index(io),
                    self.cfg.loop,
                    self.session.client("generator"),
                    round_no=io.round,
                    family_of=sandbox_family if self.cfg.loop.seed_pool == "sandbox" else None,
                )
                break
            except IndexLost:  # its actor restarted: load the pool again, once (the
                if attempt == 2:  # response cache means the generator is not paid twice)
                    raise
        storage.write_parquet(io.outputs["candidates"], candidates)  # kept: they show why
        check_candidates(candidates, self.cfg.generator.model)
        storage.write_parquet(io.outputs["new"], new)
        return StageResult(
            rows=new.num_rows,
            api={"generator": info["api"]},
            metrics=info["metrics"],
            compute_s=info["metrics"]["dedup_s"],
        )

    def pool_index(self, io: StageIO):
        """The session's index of the Cache Pool, brought to this round's pool: extended
        by the last round's new instructions when it holds the last round's pool, else
        built from the pool file (a new session, a resumed run)."""
        pool = self.session.pool_index(self.cfg.loop)
        want = io.fingerprints.get("cache_pool") or storage.fingerprint(io.inputs["cache_pool"])
        have = pool.covered()
        if have == want:
            return pool
        rows_per = self.cfg.storage.window_rows
        grew = self.run.manifest.get(f"round_{io.round - 1}/pools") if io.round else None
        if (
            grew is not None
            and grew.inputs
            and have is not None
            and grew.inputs["cache_pool"].fingerprint == have
            and self.cfg.loop.similarity != "same_payload"  # its template words are global
        ):
            new_uri = grew.inputs["new"].uri
            new_uri = (
                new_uri if "://" in new_uri or new_uri.startswith("/") else self.run.path(new_uri)
            )
            pool.add_file(new_uri, rows_per, want, have)
        else:
            pool.load(io.inputs["cache_pool"], rows_per, want)
        return pool

    def next_pools(self, io: StageIO) -> StageResult:
        """The next round's pools: the Cache Pool grows by the new instructions; the Train
        Pool is them ('paper') or grows by them ('accumulate'). Written a window at a time."""
        rows_per = self.cfg.storage.window_rows
        new = storage.read_parquet(io.inputs["new"]).select(POOL_SCHEMA.names)
        sizes = {
            "train": storage.count_rows(io.inputs["train_pool"]),
            "cache": storage.count_rows(io.inputs["cache_pool"]),
        }
        nc = append_pool(io.outputs["cache"], io.inputs["cache_pool"], new, rows_per)
        if self.cfg.loop.pool_policy == "accumulate":
            nt = append_pool(io.outputs["train"], io.inputs["train_pool"], new, rows_per)
        else:
            nt = append_pool(io.outputs["train"], None, new, rows_per)
        return StageResult(rows=nc, metrics={"sizes": sizes, "next": {"train": nt, "cache": nc}})


def append_pool(out: str, base: str | None, new, rows_per: int) -> int:
    """``base`` (a pool file, read a window at a time) followed by the ``new`` rows whose
    ids it does not have, written to ``out``; returns its rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = 0
    seen: set[str] = set()
    with storage.parquet_writer(out, POOL_SCHEMA) as write:
        if base is not None:
            for window in storage.iter_windows(base, rows_per):
                window = window.select(POOL_SCHEMA.names)
                write(window)
                rows += window.num_rows
                hits = window.filter(pc.is_in(window["id"], value_set=new["id"]))
                seen.update(hits.column("id").to_pylist())
        fresh = new.filter(
            pc.invert(pc.is_in(new["id"], value_set=pa.array(sorted(seen), pa.string())))
        )
        write(fresh)
        rows += fresh.num_rows
    return rows


def is_pool_file(uri: str) -> bool:
    """A lion-ray pool (Parquet with its id and kind columns), from its footer alone."""
    if not uri.endswith(".parquet"):
        return False
    try:
        names = storage.read_schema(uri).names
    except Exception:
        return False
    return all(name in names for name in POOL_SCHEMA.names)


def _check_aligned(stage: str, window: int, tables: dict) -> None:
    """A window's inputs must hold the same ids in the same order (each was written a window
    at a time from the same pool); a file that is not stops the stage instead of pairing
    one row's answer with another's."""
    ids = {name: t.column("id") for name, t in tables.items() if "id" in t.column_names}
    first, *rest = ids.items() if ids else [(None, None)]
    for name, column in rest:
        if not column.equals(first[1]):
            raise ValueError(
                f"{stage}: window {window + 1}: {name}'s rows are not {first[0]}'s rows in the "
                f"same order; delete the stage that wrote {name} and rerun (it is redone)"
            )


def _window_label(key: str, i: int, windows: int) -> str:
    """A stage's progress label, with its window when it has several."""
    return key if windows <= 1 else f"{key} [{i + 1}/{windows}]"


def sandbox_family(instruction: str) -> str | None:
    """The sandbox task family an instruction asks for (None: none of its phrasings)."""
    from lion_ray.sandbox.tasks import parse_instruction

    task = parse_instruction(instruction)
    return task.family if task else None


def summary_table(summaries: list[dict], title: str = "") -> Table:
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        caption="hard: hard ratio; t/s.score: mean referee scores of teacher/student; "
        "agree: order consistency; held-out: sandbox accuracy",
    )
    for col in summaries[0]:
        table.add_column(col, justify="right", min_width=len(col), no_wrap=True)
    for s in summaries:
        table.add_row(*[_cell(k, v) for k, v in s.items()])
    return table


def _cell(key: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if key == "cost $" else f"{value:.2f}"
    return str(value)


# Fields that change how fast or where the work runs, never what it produces: a resumed run
# may change them (a new provider limit, a raised budget, a bigger cluster).
OPERATIONAL_ENDPOINT_FIELDS = {
    "api_key_env",
    "requests_per_minute",
    "tokens_per_minute",
    "num_actors",
    "concurrency",
    "timeout_s",
    "max_retries",
    "budget_usd",
    "mode",
    "batch_discount",
    "batch_completion_window",
    "batch_max_requests",
    "batch_max_bytes",
    "batch_poll_s",
    "batch_retry",
    "stop_after_identical_errors",
}


def run_log_file(run_dir: str) -> str:
    """Where a run's library log lines go: <run>/logs/ray.log for a local run directory, a
    local file named after it for one on an object store (logs are appended line by line)."""
    import hashlib
    import os
    import tempfile

    if storage.is_local(run_dir):
        return os.path.join(storage.resolve(run_dir)[1], "logs", "ray.log")
    name = hashlib.sha256(run_dir.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), "lion-ray-logs", name, "ray.log")


def _results_config(cfg: LionConfig) -> dict:
    """The part of a config that decides a run's results."""
    exclude = {
        "cluster": True,
        "serve": True,
        "storage": {"run_dir", "window_rows"},  # a run may be moved; windows are how, not what
        "train": {"start_timeout_s", "poll_interval_s"},
        # which stages the last round runs, not what any stage computes
        "loop": {"last_round_generates"},
    }
    if cfg.sandbox.heldout_distribution != "target":  # a target held-out set spans the rounds
        # round r's stages do not depend on how many rounds follow: a finished run goes on
        # with more rounds (its recorded ones are kept), or a run stops after fewer
        exclude["loop"] = {"rounds", "last_round_generates"}
    for name in ("teacher", "referee", "generator"):
        exclude[name] = OPERATIONAL_ENDPOINT_FIELDS
    return cfg.model_dump(mode="json", exclude=exclude)


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} -> {y!r}")
    return out


def run(
    cfg: LionConfig,
    *,
    show_progress: bool = True,
    console: Console | None = None,
    driver_cls: type[Driver] = Driver,
    verbose: bool = False,
    student_engine=None,
) -> list[dict]:
    """Run (or resume) the whole Lion loop for ``cfg``; returns per-round summaries.
    ``driver_cls``: a Driver with stages replaced (an experiment's control arm).
    ``student_engine``: a running ``StudentEngine`` for the run's student (runs one after
    another in one process: each loads its student into it; the caller stops it).
    ``verbose``: Ray's and the libraries' own messages on the console too (else they go to
    the run's log file)."""
    console = console or make_console()
    if cfg.student.model_path:  # before Ray, the sandbox or any paid call
        from lion_ray.models import check_model_path

        check_model_path(cfg.student.model_path)
    log_file = run_log_file(cfg.storage.run_dir)
    with Session(
        cfg,
        show_progress=show_progress,
        quiet=not verbose,
        log_file=log_file,
        student_engine=student_engine,
        lazy=True,  # started by the first stage that has work to do
    ) as session:
        console.print(f"run directory: {session.run.uri}")
        if not verbose:
            console.print(f"Ray's and the libraries' messages: {log_file} (--verbose shows them)")
        summaries = driver_cls(cfg, session, console, show_progress).run_all()
    console.print(summary_table(summaries, title=f"{cfg.name}: {len(summaries)} rounds"))
    console.print(
        f"report: {storage.join(RunDir(cfg.storage.run_dir).path('report'), 'index.html')}"
    )
    return summaries
