"""The Lion loop as one job: rounds of imitation -> discrimination -> generation -> pools.

    lion-ray run --config configs/demo.yaml
    ray job submit --working-dir . -- python jobs/distill.py --config configs/demo.yaml

Every stage reads its inputs from the run directory and writes its outputs there (atomic
writes), then records itself in ``manifest.json``. A rerun skips recorded stages whose
outputs exist and redoes the rest: API stages are answered from the response cache,
training resumes from its latest checkpoint, inference and generation are deterministic.
So a driver killed at any point finishes, when rerun, with the same pools.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from rich import box
from rich.console import Console
from rich.table import Table

from lion_ray import storage
from lion_ray.config import LionConfig, dump_config, parse_config
from lion_ray.errors import LionError
from lion_ray.logic.pools import import_records, load_pool_bytes, next_pools
from lion_ray.progress import make_console
from lion_ray.session import Session
from lion_ray.storage import RunDir

HELDOUT_SEED_OFFSET = 10_000  # held-out tasks come from a seed the seed pool never uses


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

    # --- bookkeeping ------------------------------------------------------------------

    def stage(self, key: str, outputs: list[str], work: Callable[[], dict]) -> dict:
        """Run ``work`` unless the manifest records ``key`` and all its outputs exist."""
        manifest = self.run.manifest
        if manifest.is_done(key) and all(storage.exists(o) for o in outputs):
            return manifest.get(key)
        manifest.set("current_stage", key)
        self.console.print(f"[bold cyan]>[/bold cyan] {key}")
        started = time.monotonic()
        info = work()
        info["seconds"] = round(time.monotonic() - started, 2)
        manifest.mark_done(key, **info)
        return manifest.get(key)

    def check_config(self) -> None:
        """A run directory belongs to one config: resuming with another would mix results."""
        uri = self.run.path("config.yaml")
        ours = _results_config(self.cfg)
        if storage.exists(uri):
            theirs = _results_config(parse_config(storage.read_text(uri), uri))
            if theirs != ours:
                diffs = sorted(_diff(theirs, ours))
                raise LionError(
                    f"{self.run.uri} was started with a different config ({', '.join(diffs[:6])}); "
                    "rerun with the same config to resume, or set storage.run_dir to a new directory"
                )
        else:
            storage.write_text(uri, dump_config(self.cfg))

    # --- setup ------------------------------------------------------------------------

    def initial_model(self) -> str:
        if self.cfg.student.model_path:
            return self.cfg.student.model_path
        out = self.run.path("student_init")

        def build() -> dict:
            from lion_ray.student import init_student

            return init_student(out, self.cfg.student.tiny)

        self.stage("setup.student", [storage.join(out, "config.json")], build)
        return out

    def seed_pools(self) -> None:
        train_uri, cache_uri = self.run.pool(1, "train"), self.run.pool(1, "cache")

        def build() -> dict:
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
                pool, stats = load_pool_bytes(storage.read_bytes(loop.seed_pool), loop.seed_pool)
            storage.write_parquet(train_uri, pool)
            storage.write_parquet(cache_uri, pool)
            return {"rows": pool.num_rows, "import": stats.as_dict()}

        self.stage("round_1/pools.seed", [train_uri, cache_uri], build)

    def heldout(self) -> list[dict] | None:
        """Held-out sandbox tasks (with answers), disjoint from the seed pool."""
        if self.cfg.loop.seed_pool != "sandbox" or not self.cfg.sandbox.heldout_tasks:
            return None
        uri = self.run.path("heldout.jsonl")

        def build() -> dict:
            from lion_ray.sandbox.tasks import generate_tasks

            sb = self.cfg.sandbox
            seen = set(
                storage.read_parquet(self.run.pool(1, "cache")).column("instruction").to_pylist()
            )
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
            storage.write_text(uri, "".join(json.dumps(r) + "\n" for r in records))
            return {"rows": len(records)}

        self.stage("setup.heldout", [uri], build)
        return [json.loads(line) for line in storage.read_text(uri).splitlines()]

    # --- one round --------------------------------------------------------------------

    def round(self, r: int, base_model: str, heldout: list[dict] | None) -> str:
        cfg, run, session = self.cfg, self.run, self.session
        train_pool = storage.read_parquet(run.pool(r, "train"))
        cache_pool = storage.read_parquet(run.pool(r, "cache"))
        template = cfg.student.prompt_template
        show = self.show_progress

        def teacher_stage(pool, out_uri: str, label: str) -> Callable[[], dict]:
            """The teacher answers ``pool`` (Train or Cache Pool), from the response cache
            where it already has."""

            def answer() -> dict:
                from lion_ray.imitation import teacher_answers

                table, summary = teacher_answers(
                    pool,
                    session.endpoint("teacher"),
                    template=template,
                    cache_dir=run.cache_dir("teacher"),
                    spent_usd=session.spent_usd("teacher"),
                    label=label,
                    show_progress=show,
                )
                storage.write_parquet(out_uri, table)
                return {
                    "rows": table.num_rows,
                    "failed": summary["failed"],
                    "api": {"teacher": summary},
                }

            return answer

        # 1. imitation: the teacher answers the Train Pool, the student is fine-tuned on it
        teacher_train_uri = run.round_path(r, "imitation", "teacher.parquet")
        teacher_train = teacher_stage(
            train_pool, teacher_train_uri, f"round {r} teacher (Train Pool)"
        )
        self.stage(f"round_{r}/imitation.teacher", [teacher_train_uri], teacher_train)

        model_uri = run.model_dir(r)

        def train() -> dict:
            from lion_ray.engines.training import train_student

            metrics = train_student(
                storage.read_parquet(teacher_train_uri),
                cfg.train,
                base_model=base_model,
                out_uri=model_uri,
                storage_path=run.round_path(r, "imitation"),
                name="train",
                template=template,
                show_progress=show,
            )
            return {
                "rows": metrics["rows"],
                "failed": metrics["skipped_failed_rows"],
                "metrics": metrics,
            }

        self.stage(f"round_{r}/imitation.train", [storage.join(model_uri, "config.json")], train)

        # 2. discrimination: teacher and student answer the Cache Pool, the referee judges
        teacher_cache_uri = run.round_path(r, "discrimination", "teacher.parquet")
        teacher_cache = teacher_stage(
            cache_pool, teacher_cache_uri, f"round {r} teacher (Cache Pool)"
        )
        self.stage(f"round_{r}/discrimination.teacher", [teacher_cache_uri], teacher_cache)

        student_uri = run.round_path(r, "discrimination", "student.parquet")

        def student() -> dict:
            from lion_ray.engines.inference import student_answers

            table, summary = student_answers(
                cache_pool,
                cfg.student,
                model_uri=model_uri,
                label=f"round {r} student (Cache Pool)",
                show_progress=show,
            )
            storage.write_parquet(student_uri, table)
            return {"rows": table.num_rows, "failed": summary["failed"], "metrics": summary}

        self.stage(f"round_{r}/discrimination.student", [student_uri], student)

        judged_uri = run.round_path(r, "discrimination", "judged.parquet")

        def referee() -> dict:
            from lion_ray.discrimination import judge, pair_answers

            pairs = pair_answers(
                cache_pool,
                storage.read_parquet(teacher_cache_uri),
                storage.read_parquet(student_uri),
            )
            judged, info = judge(
                pairs,
                session.endpoint("referee"),
                cache_dir=run.cache_dir("referee"),
                tau=cfg.loop.tau,
                max_reasks=cfg.loop.referee_max_reasks,
                spent_usd=session.spent_usd("referee"),
                show_progress=show,
            )
            storage.write_parquet(judged_uri, judged)
            m = info["metrics"]
            return {
                "rows": judged.num_rows,
                "failed": m["failed"] + m["unparsed"],
                "metrics": m,
                "api": {"referee": info["api"]},
            }

        self.stage(f"round_{r}/discrimination.referee", [judged_uri], referee)

        if heldout:
            heldout_uri = run.round_path(r, "eval", "heldout.parquet")

            def evaluate() -> dict:
                from lion_ray.engines.inference import student_answers
                from lion_ray.sandbox.tasks import heldout_accuracy

                pool = import_records([(h, "heldout") for h in heldout], source="heldout")[0]
                table, _ = student_answers(
                    pool,
                    cfg.student,
                    model_uri=model_uri,
                    label=f"round {r} held-out eval",
                    show_progress=show,
                )
                storage.write_parquet(heldout_uri, table)
                answers = dict(
                    zip(
                        table.column("instruction").to_pylist(),
                        table.column("answer").to_pylist(),
                        strict=True,
                    )
                )
                return {"rows": table.num_rows, "metrics": heldout_accuracy(heldout, answers)}

            self.stage(f"round_{r}/eval.heldout", [heldout_uri], evaluate)

        # 3. generation: new instructions from the hard and the easy ones
        new_uri = run.round_path(r, "generation", "new.parquet")
        candidates_uri = run.round_path(r, "generation", "candidates.parquet")

        def generation() -> dict:
            from lion_ray.generation import generate

            new, candidates, info = generate(
                storage.read_parquet(judged_uri),
                cache_pool,
                cfg.loop,
                session.endpoint("generator"),
                round_no=r,
                cache_dir=run.cache_dir("generator"),
                spent_usd=session.spent_usd("generator"),
                dedup_workers=2,
                show_progress=show,
            )
            storage.write_parquet(candidates_uri, candidates)
            storage.write_parquet(new_uri, new)
            return {
                "rows": new.num_rows,
                "metrics": info["metrics"],
                "api": {"generator": info["api"]},
            }

        self.stage(f"round_{r}/generation", [new_uri, candidates_uri], generation)

        # 4. pools for the next round
        next_train_uri, next_cache_uri = run.pool(r + 1, "train"), run.pool(r + 1, "cache")

        def pools() -> dict:
            nt, nc = next_pools(
                train_pool, cache_pool, storage.read_parquet(new_uri), cfg.loop.pool_policy
            )
            storage.write_parquet(next_train_uri, nt)
            storage.write_parquet(next_cache_uri, nc)
            return {
                "rows": nc.num_rows,
                "sizes": {"train": train_pool.num_rows, "cache": cache_pool.num_rows},
                "next": {"train": nt.num_rows, "cache": nc.num_rows},
            }

        self.stage(f"round_{r}/pools", [next_train_uri, next_cache_uri], pools)
        return model_uri

    # --- the loop ---------------------------------------------------------------------

    def run_all(self) -> list[dict]:
        from lion_ray.report import collect, round_summary, write_report

        self.check_config()
        model = self.initial_model()
        self.seed_pools()
        heldout = self.heldout()
        summaries = []
        for r in range(1, self.cfg.loop.rounds + 1):
            model = self.round(r, model, heldout)
            report_uri = write_report(self.run, r, self.cfg.name)
            summary = round_summary(collect(self.run, r)["rounds"][-1])
            summaries.append(summary)
            self.console.print(summary_table([summary], title=f"round {r} done"))
            self.console.print(f"report: {report_uri}")
        self.run.manifest.set("current_stage", None)
        self.run.manifest.set("finished_rounds", self.cfg.loop.rounds)
        return summaries


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
}


def _results_config(cfg: LionConfig) -> dict:
    """The part of a config that decides a run's results."""
    exclude = {"cluster": True, "serve": True, "storage": {"run_dir"}}  # a run may be moved
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
    cfg: LionConfig, *, show_progress: bool = True, console: Console | None = None
) -> list[dict]:
    """Run (or resume) the whole Lion loop for ``cfg``; returns per-round summaries."""
    console = console or make_console()
    with Session(cfg) as session:
        if session.dashboard_url:
            console.print(f"Ray dashboard: {session.dashboard_url}")
        console.print(f"run directory: {session.run.uri}")
        summaries = Driver(cfg, session, console, show_progress).run_all()
    console.print(summary_table(summaries, title=f"{cfg.name}: {len(summaries)} rounds"))
    console.print(
        f"report: {storage.join(RunDir(cfg.storage.run_dir).path('report'), 'index.html')}"
    )
    return summaries
