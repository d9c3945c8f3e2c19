"""The `lion-ray` command line. Each command parses its arguments and hands over to the
module that does the work; heavy imports (Ray, torch) happen inside the commands so that
`lion-ray --help` stays instant."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lion_ray.errors import LionError
from lion_ray.progress import make_console

app = typer.Typer(
    help="lion-ray: adversarial distillation (Lion) of a closed LLM into an open student, on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Validate and show run configs.", no_args_is_help=True)
pool_app = typer.Typer(help="Import, inspect and export instruction pools.", no_args_is_help=True)
student_app = typer.Typer(help="Build the tiny local student model.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(pool_app, name="pool")
sandbox_app = typer.Typer(
    help="The embedded sandbox world (teacher, referee, generator).", no_args_is_help=True
)
app.add_typer(student_app, name="student")
app.add_typer(sandbox_app, name="sandbox")

console = make_console()
err_console = make_console(stderr=True)

ConfigPath = Annotated[
    Path, typer.Argument(help="YAML run config, or a packaged one (demo, paper).", exists=False)
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a field, e.g. --set train.lr=1e-5 (repeatable)."),
]


@contextmanager
def user_errors():
    """Print a user-fixable error on one line and exit 1; anything else is a real bug."""
    try:
        yield
    except LionError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _path(value: str | None, model: bool = False) -> str | None:
    """A path as the user typed it: relative to where the command runs, resolved once, at
    the start (object-store URIs unchanged; a ``model`` that exists nowhere here and reads
    'org/name' is left as a hub id)."""
    if value is None or "://" in value:
        return value
    path = os.path.abspath(os.path.expanduser(value))
    if model and not os.path.exists(path):
        from lion_ray.models import looks_like_hub_id

        return value if looks_like_hub_id(value) else path
    return path


def _load(config: Path | None, overrides: list[str] | None):
    from lion_ray.config import load_config

    return load_config(config, overrides or [])


# --- config ----------------------------------------------------------------------------------


@config_app.command("validate")
def config_validate(config: ConfigPath, set_: SetOption = None) -> None:
    """Check a config; every invalid field is named with what is allowed."""
    with user_errors():
        cfg = _load(config, set_)
    console.print(
        f"[green]ok[/green] {config}: valid ({cfg.loop.rounds} rounds, run dir {cfg.storage.run_dir})"
    )


@config_app.command("show")
def config_show(
    config: Annotated[
        Path | None, typer.Argument(help="YAML config; omit for the defaults.")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Print the resolved config (defaults filled in, overrides applied) as YAML."""
    from lion_ray.config import dump_config

    with user_errors():
        cfg = _load(config, set_)
    sys.stdout.write(dump_config(cfg))


@config_app.command("fit")
def config_fit(
    config: ConfigPath,
    cluster: Annotated[
        Path,
        typer.Option(
            "--cluster",
            help="A KubeRay RayCluster, RayJob or RayService manifest (YAML).",
            exists=True,
            dir_okay=False,
        ),
    ],
    set_: SetOption = None,
) -> None:
    """Would this run fit that cluster? Every step the run asks Ray for, checked as the run
    checks it, against the manifest's node groups at their largest (maxReplicas), with
    what the run holds at that step. No Ray starts. Exit 0 when every step fits, 1 naming
    what is short."""
    import yaml

    from lion_ray.engines.plan import fit
    from lion_ray.logic.manifests import KINDS, cluster_nodes, node_groups

    with user_errors():
        cfg = _load(config, set_)
        try:
            docs = [d for d in yaml.safe_load_all(cluster.read_text()) if isinstance(d, dict)]
        except yaml.YAMLError as exc:
            raise LionError(f"{cluster}: not YAML ({exc})") from None
        doc = next((d for d in docs if d.get("kind") in KINDS), docs[0] if docs else {})
        groups = node_groups(doc, str(cluster))
        results = fit(cfg, *cluster_nodes(groups))
    console.print(
        f"{cluster}: "
        + "; ".join(
            f"{g.name}: {g.up}..{g.most} x "
            + ", ".join(f"{v:g} {k}" for k, v in sorted(g.resources.items()))
            for g in groups
        )
    )
    for r in results:
        asks = f"{r.step.request.count} x {{" + ", ".join(
            f"{v:g} {k}" for k, v in sorted(r.step.request.asks().items())
        )
        verdict = "[red]no[/red]" if r.problem else ("yes, once scaled up" if r.scales else "yes")
        console.print(f"{verdict}: {r.step.name} asks {asks}}}", highlight=False)
        if r.step.held:
            held = "; ".join(f"{h} ({q.count})" for h, q in r.step.held.items())
            console.print(f"  [dim]beside {held}[/dim]", highlight=False)
    short = [r for r in results if r.problem]
    for r in short:
        err_console.print(f"[bold red]short:[/bold red] {r.problem}", highlight=False)
    if short:
        raise typer.Exit(1)


# --- pools -----------------------------------------------------------------------------------


@pool_app.command("import")
def pool_import(
    src: Annotated[
        str, typer.Argument(help="Alpaca JSON array, JSONL, Parquet or self-instruct seed tasks.")
    ],
    out: Annotated[str, typer.Option("--out", help="Output pool (.parquet, local path or URI).")],
    source: Annotated[
        str | None, typer.Option(help="Provenance label (default: file name).")
    ] = None,
) -> None:
    """Import instructions into a pool with stable ids; exact duplicates are dropped."""
    from lion_ray import storage
    from lion_ray.logic.pools import load_pool_bytes

    with user_errors():
        data = _read_input(src)
        table, stats = load_pool_bytes(data, src, source=source)
        storage.write_parquet(out, table)
    console.print(
        f"imported {stats.imported} instructions from {src} -> {out} "
        f"(records {stats.records}, duplicates dropped {stats.duplicates}, empty skipped {stats.empty})"
    )


def _read_input(uri: str) -> bytes:
    from lion_ray import storage

    if not storage.exists(uri):
        raise LionError(f"{uri}: no such file")
    return storage.read_bytes(uri)


def _read_pool(uri: str):
    from lion_ray.logic.pools import load_pool_bytes

    return load_pool_bytes(_read_input(uri), uri)[0]


@pool_app.command("stats")
def pool_stats_cmd(
    pool: Annotated[str, typer.Argument(help="Pool file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Row counts by kind, round and source, and instruction lengths."""
    from lion_ray.logic.pools import pool_stats

    with user_errors():
        stats = pool_stats(_read_pool(pool))
    if as_json:
        console.print_json(json.dumps(stats))
        return
    table = Table(title=f"{pool}", show_header=False)
    table.add_row("rows", str(stats["rows"]))
    table.add_row("with input", str(stats["with_input"]))
    table.add_row("with reference output", str(stats["with_output"]))
    table.add_row("by kind", ", ".join(f"{k}: {v}" for k, v in stats["by_kind"].items()))
    table.add_row("by round", ", ".join(f"{k}: {v}" for k, v in stats["by_round"].items()))
    table.add_row("by source", ", ".join(f"{k}: {v}" for k, v in stats["by_source"].items()))
    w = stats["instruction_words"]
    table.add_row("instruction words", f"min {w['min']}, mean {w['mean']}, max {w['max']}")
    console.print(table)


@pool_app.command("export")
def pool_export(
    pool: Annotated[str, typer.Argument(help="Pool file.")],
    out: Annotated[str, typer.Option("--out", help="Output file.")],
    fmt: Annotated[str, typer.Option("--format", help="json (array) or jsonl.")] = "jsonl",
) -> None:
    """Export a pool in Alpaca shape (instruction, input, output)."""
    from lion_ray import storage
    from lion_ray.logic.pools import to_alpaca

    if fmt not in ("json", "jsonl"):
        err_console.print(
            f"[bold red]error:[/bold red] --format must be json or jsonl, got {fmt!r}"
        )
        raise typer.Exit(2)
    with user_errors():
        records = to_alpaca(_read_pool(pool))
        if fmt == "json":
            text = json.dumps(records, ensure_ascii=False, indent=2) + "\n"
        else:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        storage.write_text(out, text)
    console.print(f"exported {len(records)} records -> {out}")


# --- student ---------------------------------------------------------------------------------


@student_app.command("init")
def student_init(
    out: Annotated[str, typer.Option("--out", help="Output model directory (local path or URI).")],
    config: Annotated[
        Path | None, typer.Option("--config", help="Run config (uses student.tiny).")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Build the tiny Llama student and a locally trained tokenizer (Hugging Face format)."""
    from lion_ray.student import init_student

    with user_errors():
        cfg = _load(config, set_)
    info = init_student(out, cfg.student.tiny)
    console.print(
        f"tiny student ({info['parameters'] / 1e6:.2f}M parameters, vocab {info['vocab_size']}) -> {out}"
    )


# --- sandbox ---------------------------------------------------------------------------------


@sandbox_app.command("tasks")
def sandbox_tasks(
    out: Annotated[
        str,
        typer.Option(
            "--out", help="Output JSONL (instruction, input, output, family, difficulty)."
        ),
    ],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of distinct tasks.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same tasks.")] = 0,
    max_difficulty: Annotated[int, typer.Option(min=1, max=5, help="Hardest level (1..5).")] = 5,
    min_difficulty: Annotated[int, typer.Option(min=1, max=5, help="Easiest level (1..5).")] = 1,
) -> None:
    """Write sandbox tasks with their answers (for pools and held-out evaluation)."""
    from lion_ray import storage
    from lion_ray.sandbox.tasks import generate_tasks

    with user_errors():
        if min_difficulty > max_difficulty:
            raise LionError(
                f"--min-difficulty ({min_difficulty}) is above --max-difficulty ({max_difficulty})"
            )
        tasks = generate_tasks(
            n, seed=seed, max_difficulty=max_difficulty, min_difficulty=min_difficulty
        )
        storage.write_text(out, "".join(json.dumps(t.as_record()) + "\n" for t in tasks))
    console.print(f"wrote {len(tasks)} tasks -> {out}")


@sandbox_app.command("serve")
def sandbox_serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one; printed at start).")] = 8765,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute before 429s.")] = None,
    tpm: Annotated[
        int | None, typer.Option(help="Tokens per minute (prompt + max_tokens) before 429s.")
    ] = None,
    burst_s: Annotated[
        float, typer.Option(help="Window over which limits are enforced (s).")
    ] = 1.0,
    error_rate: Annotated[float, typer.Option(help="Fraction of random 500/503 answers.")] = 0.0,
    latency_ms: Annotated[float, typer.Option(help="Mean added latency (ms).")] = 0.0,
    latency_sd_ms: Annotated[
        float, typer.Option(help="Latency standard deviation (lognormal).")
    ] = 0.0,
    slow_rate: Annotated[
        float, typer.Option(help="Fraction of responses delayed by --slow-ms.")
    ] = 0.0,
    slow_ms: Annotated[float, typer.Option(help="Delay of a slow response (ms).")] = 30_000.0,
    malformed_rate: Annotated[
        float, typer.Option(help="Fraction of referee reviews without valid scores.")
    ] = 0.0,
    teacher_error_rate: Annotated[
        float, typer.Option(help="Fraction of wrong teacher answers.")
    ] = 0.0,
    api_key_env: Annotated[
        str | None, typer.Option(help="Require a bearer key equal to this variable.")
    ] = None,
    fault_seed: Annotated[int | None, typer.Option(help="Seed for random faults.")] = None,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            "--fault",
            help="A provider error, NAME or NAME:RATE (repeatable): insufficient_quota, "
            "bad_param, reset, gateway.",
        ),
    ] = None,
    batch_delay_s: Annotated[float, typer.Option(help="Seconds until a batch completes.")] = 1.0,
    batch_fail_rate: Annotated[
        float, typer.Option(help="Fraction of batch lines failing on their first submission.")
    ] = 0.0,
    batch_expire_rate: Annotated[
        float, typer.Option(help="Fraction of batches expiring with half their lines done.")
    ] = 0.0,
) -> None:
    """Run the OpenAI-compatible sandbox server in the foreground."""
    from lion_ray.sandbox.server import ServerOptions, run_server

    for name, rate in [
        ("error-rate", error_rate),
        ("slow-rate", slow_rate),
        ("malformed-rate", malformed_rate),
        ("teacher-error-rate", teacher_error_rate),
        ("batch-fail-rate", batch_fail_rate),
        ("batch-expire-rate", batch_expire_rate),
    ]:
        if not 0 <= rate <= 1:
            err_console.print(f"[bold red]error:[/bold red] --{name} must be in 0..1, got {rate}")
            raise typer.Exit(2)
    options = ServerOptions(
        rpm=rpm,
        tpm=tpm,
        burst_s=burst_s,
        error_rate=error_rate,
        latency_ms=latency_ms,
        latency_sd_ms=latency_sd_ms,
        slow_rate=slow_rate,
        slow_ms=slow_ms,
        malformed_rate=malformed_rate,
        teacher_error_rate=teacher_error_rate,
        api_key_env=api_key_env,
        fault_seed=fault_seed,
        faults=tuple(fault or ()),
        batch_delay_s=batch_delay_s,
        batch_fail_rate=batch_fail_rate,
        batch_expire_rate=batch_expire_rate,
    )
    try:
        options.fault_rates()
    except ValueError as exc:
        err_console.print(f"[bold red]error:[/bold red] --fault: {exc}")
        raise typer.Exit(2) from None
    run_server(options, host, port)


# --- answers (API roles and the student) -------------------------------------------------------


@app.command("answer")
def answer(
    input_: Annotated[str, typer.Option("--input", help="Input pool (any pool format).")],
    output: Annotated[str, typer.Option("--output", help="Output Parquet.")],
    role: Annotated[
        str | None, typer.Option(help="teacher | referee | generator (API roles).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Student model directory: answer with the student.")
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="Student backend: hf | vllm (default: config).")
    ] = None,
    kind: Annotated[str, typer.Option(help="Generator rule: hard | easy.")] = "hard",
    config: Annotated[
        Path | None, typer.Option("--config", help="Run config (endpoints, student).")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Answer a pool with an API role (teacher, referee, generator) or with a student model.

    The referee reads a table with instruction, input, answer_1 and answer_2 columns. API
    responses are cached under <run_dir>/cache/<role>, so a rerun pays for none of them.
    """
    from lion_ray import storage

    if (role is None) == (model is None):
        err_console.print(
            "[bold red]error:[/bold red] give exactly one of --role (API) or --model (student)"
        )
        raise typer.Exit(2)
    if role is not None and role not in ("teacher", "referee", "generator"):
        err_console.print(
            f"[bold red]error:[/bold red] --role must be teacher, referee or generator, got {role!r}"
        )
        raise typer.Exit(2)
    with user_errors():
        cfg = _load(config, set_)
        if model is not None:
            from lion_ray.models import check_model_path

            model = _path(model, model=True)
            check_model_path(model, "--model")
            overrides = {"model_path": model} | ({"backend": backend} if backend else {})
            cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update=overrides)})
            from lion_ray.config import StudentConfig

            StudentConfig.model_validate(cfg.student.model_dump())
        table, summary = _answer(cfg, role, kind, input_)
        storage.write_parquet(output, table)
    console.print(f"wrote {table.num_rows} rows -> {output}")
    console.print_json(json.dumps(summary))


def _answer(cfg, role: str | None, kind: str, input_uri: str):
    from lion_ray.session import Session

    with Session(cfg, need_endpoints=role is not None) as session:
        if role is None:
            from lion_ray.engines.inference import student_answers

            return student_answers(_read_pool(input_uri), cfg.student)
        session.bill_to(f"answer --role {role}")
        client = session.client(role)
        if role == "teacher":
            from lion_ray.imitation import teacher_answers

            return teacher_answers(_read_pool(input_uri), client)
        if role == "referee":
            from lion_ray.discrimination import judge

            return judge(
                _read_table(input_uri),
                client,
                max_reasks=cfg.loop.referee_max_reasks,
                tau=cfg.loop.tau,
                structured=cfg.referee.structured_output,
            )
        from lion_ray.generation import ask_generator

        return ask_generator(_read_pool(input_uri), kind, client)


@app.command("train")
def train_cmd(
    data: Annotated[
        str, typer.Option(help="Answers Parquet (instruction, input, answer, status).")
    ],
    model: Annotated[str, typer.Option(help="Base model directory (Hugging Face format) or URI.")],
    out: Annotated[str, typer.Option("--out", help="Where the fine-tuned model is exported.")],
    workers: Annotated[
        int | None, typer.Option(min=1, help="Ray Train workers (default: config).")
    ] = None,
    gpus_per_worker: Annotated[
        int | None, typer.Option(min=0, help="GPUs per worker; 0 trains on CPU.")
    ] = None,
    zero: Annotated[
        int | None, typer.Option(min=2, max=3, help="DeepSpeed ZeRO stage: 2 or 3.")
    ] = None,
    checkpoints: Annotated[
        str | None,
        typer.Option(
            help="Ray Train storage (default: <out>.checkpoints); "
            "rerunning with the same one resumes."
        ),
    ] = None,
    placement: Annotated[
        str | None, typer.Option(help="Worker placement: PACK, SPREAD or STRICT_SPREAD.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Run config (train section, template).")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Fine-tune a student on answers with Ray Train + DeepSpeed; resumes when rerun."""
    from lion_ray.engines.training import train_student
    from lion_ray.session import Session

    overrides = list(set_ or [])
    for key, value in (
        ("workers", workers),
        ("gpus_per_worker", gpus_per_worker),
        ("zero_stage", zero),
        ("placement", placement),
    ):
        if value is not None:
            overrides.append(f"train.{key}={value}")
    from lion_ray.models import check_model_path

    data, out, checkpoints = (_path(p) for p in (data, out, checkpoints))
    model = _path(model, model=True)
    with user_errors():
        cfg = _load(config, overrides)
        check_model_path(model, "--model")
        answers = _read_table(data)
        with Session(cfg, need_endpoints=False):
            metrics = train_student(
                answers,
                cfg.train,
                base_model=model,
                out_uri=out,
                storage_path=checkpoints or f"{out.rstrip('/')}.checkpoints",
                student=cfg.student,
            )
    console.print(f"exported the fine-tuned student -> {out}")
    console.print_json(json.dumps(metrics))


@app.command("discriminate")
def discriminate_cmd(
    pool: Annotated[str, typer.Option(help="Cache Pool the answers belong to.")],
    teacher: Annotated[
        str, typer.Option(help="Teacher answers (Parquet from `answer --role teacher`).")
    ],
    student: Annotated[str, typer.Option(help="Student answers (Parquet from `answer --model`).")],
    out: Annotated[str, typer.Option("--out", help="Judged rows (Parquet).")],
    config: Annotated[
        Path | None, typer.Option("--config", help="Run config (referee, loop.tau).")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Judge every (teacher, student) pair in both orders and split hard from easy."""
    from lion_ray import storage
    from lion_ray.discrimination import judge, pair_answers
    from lion_ray.session import Session

    with user_errors():
        cfg = _load(config, set_)
        pairs = pair_answers(_read_pool(pool), _read_table(teacher), _read_table(student))
        with Session(cfg) as session:
            session.bill_to("discriminate")
            judged, info = judge(
                pairs,
                session.client("referee"),
                tau=cfg.loop.tau,
                max_reasks=cfg.loop.referee_max_reasks,
                structured=cfg.referee.structured_output,
            )
        storage.write_parquet(out, judged)
    console.print(f"wrote {judged.num_rows} judged rows -> {out}")
    console.print_json(json.dumps(info))


@app.command("generate")
def generate_cmd(
    judged: Annotated[str, typer.Option(help="Judged rows (from `discriminate`).")],
    pool: Annotated[str, typer.Option(help="Cache Pool to deduplicate against.")],
    out: Annotated[str, typer.Option("--out", help="New instructions (pool Parquet).")],
    round_no: Annotated[
        int, typer.Option("--round", min=1, help="Round number recorded as provenance.")
    ] = 1,
    candidates: Annotated[
        str | None, typer.Option(help="Also write every candidate with its fate.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Run config (generator, loop targets).")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Write new instructions from the hard and easy ones: filtered and ROUGE-L deduplicated."""
    from lion_ray import storage
    from lion_ray.generation import generate
    from lion_ray.session import Session

    with user_errors():
        cfg = _load(config, set_)
        with Session(cfg) as session:
            session.bill_to("generate")
            new, cands, info = generate(
                _read_table(judged),
                _read_pool(pool),
                cfg.loop,
                session.client("generator"),
                round_no=round_no,
            )
        storage.write_parquet(out, new)
        if candidates:
            storage.write_parquet(candidates, cands)
    console.print(f"wrote {new.num_rows} new instructions -> {out}")
    console.print_json(json.dumps(info))


@app.command("dedup")
def dedup_cmd(
    pool: Annotated[str, typer.Option(help="Reference pool (any pool format).")],
    candidates: Annotated[
        str, typer.Option(help="Candidate instructions (any pool format), in order.")
    ],
    out: Annotated[str, typer.Option("--out", help="Accepted candidates (pool Parquet).")],
    threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Reject when ROUGE-L F is above this.")
    ] = 0.7,
    workers: Annotated[
        int, typer.Option(min=0, help="Ray workers for the pool check (0: in process).")
    ] = 0,
) -> None:
    """Drop candidates whose ROUGE-L F against the pool or an earlier accepted candidate is above
    the threshold: the same decisions as rouge-score over all pairs, much faster."""
    import time

    from lion_ray import storage
    from lion_ray.engines.dedup import offer_all
    from lion_ray.logic.dedup import Deduper

    with user_errors():
        ref, cands = _read_pool(pool), _read_pool(candidates)
        if workers > 1:
            from lion_ray.engines.cluster import init_ray

            init_ray(quiet=True)
        t = time.perf_counter()
        keep = offer_all(
            Deduper(ref.column("instruction").to_pylist(), threshold),
            cands.column("instruction").to_pylist(),
            workers,
        )
        elapsed = time.perf_counter() - t
        storage.write_parquet(out, cands.filter(pa_mask(keep)))
    console.print(
        f"kept {sum(keep)} of {len(keep)} candidates ({len(keep) - sum(keep)} too similar, ROUGE-L F > "
        f"{threshold}) against {ref.num_rows} pool instructions in {elapsed:.2f}s -> {out}"
    )


def pa_mask(values: list[bool]):
    import pyarrow as pa

    return pa.array(values, type=pa.bool_())


def _read_table(uri: str):
    import pyarrow.parquet as pq

    from lion_ray import storage

    if not storage.exists(uri):
        raise LionError(f"{uri}: no such file")
    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs)


# --- the loop ----------------------------------------------------------------------------------


@app.command("run")
def run_cmd(
    config: Annotated[
        Path,
        typer.Option("--config", help="Run config: a YAML file, or a packaged one (demo, paper)."),
    ] = Path("demo"),
    set_: SetOption = None,
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="Plain log lines instead of bars.")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", help="Ray's own messages on the console too (else: <run>/logs/ray.log)."
        ),
    ] = False,
) -> None:
    """Run the Lion loop: rounds of imitation, discrimination, generation. Rerun to resume."""
    from lion_ray.driver import run

    with user_errors():
        cfg = _load(config, set_)
        run(cfg, show_progress=not no_progress, console=console, verbose=verbose)


@app.command("status")
def status_cmd(
    run_dir: Annotated[str, typer.Option("--run", help="Run directory (path or URI).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Rounds, stages, row counts, failures, tokens and cost of a run."""
    from lion_ray import storage
    from lion_ray.status import status_table

    with user_errors():
        if not storage.exists(storage.join(run_dir, "manifest.json")):
            raise LionError(f"{run_dir}: no manifest.json; is this a lion-ray run directory?")
        table, manifest = status_table(run_dir)
    if as_json:
        console.print_json(json.dumps(manifest))
    else:
        console.print(table)


# --- evaluation and weights ----------------------------------------------------------------------


def _endpoint_override(cfg, role: str, spec: str):
    """'teacher'/'referee' keep the config's endpoint; 'sandbox' or a URL replace its base_url."""
    if spec in ("teacher", "referee", "generator"):
        return cfg.endpoints()[spec]
    if spec == "sandbox" or spec.startswith(("http://", "https://")):
        return cfg.endpoints()[role].model_copy(update={"base_url": spec})
    raise LionError(
        f"{spec!r} is not an endpoint: use teacher, referee, sandbox or an http(s):// URL"
    )


@app.command("eval")
def eval_cmd(
    questions: Annotated[
        str, typer.Option(help="Questions: Vicuna JSONL (question_id, text, category) or a pool.")
    ],
    candidate: Annotated[str, typer.Option(help="Student model directory, or an answers file.")],
    out: Annotated[
        str, typer.Option("--out", help="Output directory (eval.md, eval.json, by_category.png).")
    ],
    reference: Annotated[
        str, typer.Option(help="Answers file, or an endpoint: teacher, sandbox or a URL.")
    ] = "teacher",
    judge: Annotated[
        str, typer.Option(help="Judge endpoint: referee, sandbox or a URL.")
    ] = "referee",
    title: Annotated[str | None, typer.Option(help="Title of the table.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Run config (endpoints, student template).")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Relative score of a candidate against a reference, judged in both orders, per category."""
    from lion_ray import evaluation, storage
    from lion_ray.session import Session

    with user_errors():
        cfg = _load(config, set_)
        qs = evaluation.load_questions(questions)
        reference_is_file = storage.exists(reference) and not reference.startswith("http")
        teacher = (
            cfg.teacher if reference_is_file else _endpoint_override(cfg, "teacher", reference)
        )
        cfg = cfg.model_copy(
            update={"teacher": teacher, "referee": _endpoint_override(cfg, "referee", judge)}
        )
        with Session(cfg) as session:  # calls are cached and billed in the config's run dir
            session.bill_to(f"eval {out}")
            if storage.exists(storage.join(candidate, "config.json")):
                cand = evaluation.answer_with_student(qs, candidate, cfg.student)
            else:
                cand = evaluation.load_answers(candidate, qs)
            if reference_is_file:
                ref = evaluation.load_answers(reference, qs)
            else:
                ref = evaluation.answer_with_endpoint(qs, session.client("teacher"))
            judged, result = evaluation.judge_pairs(
                qs,
                cand,
                ref,
                session.client("referee"),
                cfg.loop.referee_max_reasks,
                cfg.referee.structured_output,
            )
        name = title or f"{candidate} vs {reference}"
        table = evaluation.write_outputs(out, name, result, judged, cand, ref)
    console.print(table, markup=False, highlight=False)
    console.print(f"wrote {out}/eval.md, eval.json, by_category.png")


weights_app = typer.Typer(
    help="Release a student as delta weights against its base, and recover it.",
    no_args_is_help=True,
)
app.add_typer(weights_app, name="weights")


@weights_app.command("diff")
def weights_diff(
    base: Annotated[str, typer.Option(help="Base model directory (Hugging Face format).")],
    tuned: Annotated[str, typer.Option(help="Fine-tuned model directory.")],
    out: Annotated[str, typer.Option("--out", help="Delta directory to write.")],
) -> None:
    """Write the delta of a fine-tuned model against its base (bit-exact, with checksums)."""
    from lion_ray import weights

    with user_errors():
        info = weights.diff(weights.local(base), weights.local(tuned), weights.local(out))
    console.print(
        f"delta of {info['tensors']} tensors ({info['added_rows']} added embedding rows) -> {out}"
    )


@weights_app.command("recover")
def weights_recover(
    base: Annotated[str, typer.Option(help="The base model the delta was made against.")],
    diff: Annotated[str, typer.Option(help="Delta directory from `weights diff`.")],
    out: Annotated[str, typer.Option("--out", help="Where to write the recovered model.")],
) -> None:
    """Rebuild the fine-tuned model from its base and a delta; refuses a mismatched base."""
    from lion_ray import weights

    with user_errors():
        info = weights.recover(weights.local(base), weights.local(diff), weights.local(out))
    console.print(
        f"recovered {info['tensors']} tensors (sha256 {info['tuned_sha256'][:12]}..., verified) -> {out}"
    )


# --- serving -----------------------------------------------------------------------------------


@app.command("serve")
def serve_cmd(
    run_dir: Annotated[
        str | None,
        typer.Option(
            "--run",
            help="Serve the newest round's student of this run, "
            "swapping in newer rounds as they finish.",
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Serve this exported student.")
    ] = None,
    host: Annotated[str | None, typer.Option(help="HTTP host (default: serve.host).")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default: serve.port).")] = None,
    backend: Annotated[
        str | None, typer.Option(help="hf or vllm (default: serve.backend).")
    ] = None,
    api_keys_env: Annotated[
        str | None, typer.Option(help="Variable with comma-separated bearer keys.")
    ] = None,
    admin_keys_env: Annotated[
        str | None, typer.Option(help="Variable with comma-separated admin keys.")
    ] = None,
    allow_unauthenticated: Annotated[
        bool,
        typer.Option(
            "--allow-unauthenticated",
            help="Serve without keys on a non-loopback host (off: refused).",
        ),
    ] = False,
    detach: Annotated[
        bool, typer.Option(help="Deploy and return (needs a running cluster: RAY_ADDRESS).")
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="Run config (serve section, template).")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Serve the student behind an OpenAI-compatible Ray Serve endpoint with a chat page at /."""
    import signal
    import time

    from lion_ray.engines.serving import deploy
    from lion_ray.session import Session

    # a parent that ignores SIGINT (a test runner, a job shell) passes that on; Ctrl-C must stop us
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if (run_dir is None) == (model is None):
        err_console.print(
            "[bold red]error:[/bold red] give exactly one of --run DIR or --model DIR"
        )
        raise typer.Exit(2)
    overrides = list(set_ or [])
    for key, value in (
        ("host", host),
        ("port", port),
        ("backend", backend),
        ("api_keys_env", api_keys_env),
        ("admin_keys_env", admin_keys_env),
        ("allow_unauthenticated", "true" if allow_unauthenticated else None),
    ):
        if value is not None:
            overrides.append(f"serve.{key}={value}")
    with user_errors():
        cfg = _load(config, overrides)
        model, run_dir = _path(model, model=True), _path(run_dir)
        with Session(cfg, need_endpoints=False, quiet=True):
            try:  # Ctrl-C at any point, even while deploying, stops the server cleanly
                url = deploy(cfg.serve, student=cfg.student, model_dir=model, run_dir=run_dir)
                console.print(
                    f"serving {model or 'the newest student of ' + run_dir} at {url} "
                    f"(OpenAI API under {url}/v1, chat page at {url}/)"
                )
                if not cfg.serve.api_keys_env:
                    console.print(
                        "[yellow]warning:[/yellow] serving WITHOUT authentication: anyone who "
                        "can reach it can use it (set serve.api_keys_env)"
                    )
                if detach:
                    return
                console.print("Ctrl-C to stop")
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                console.print("stopping the server")
                _stop_bounded(console)


def _stop_bounded(console, limit_s: float = 60.0) -> None:
    """Shut Serve, then this driver's Ray, down, each within ``limit_s``: after Ctrl-C the
    terminal must come back even when a teardown hangs (seen on a loaded CI machine)."""
    import threading

    import ray
    from ray import serve

    for name, stop in (("Serve", serve.shutdown), ("Ray", ray.shutdown)):
        worker = threading.Thread(target=stop, daemon=True)
        worker.start()
        worker.join(limit_s)
        if worker.is_alive():
            console.print(f"[yellow]warning:[/yellow] {name} did not stop within {limit_s:.0f} s")
            sys.stdout.flush()
            os._exit(0)  # the local Ray processes share this process's fate


def main() -> None:
    app()


if __name__ == "__main__":
    main()
