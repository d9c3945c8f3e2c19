"""Per-round report: JSON plus a static HTML page with PNG plots.

Everything is read back from the run directory (the manifest and the stages' Parquet
files), so a report can be rebuilt for any finished round, and it shows exactly what the
stages wrote. Written to ``round_<r>/report/`` and mirrored to ``report/`` at the run's top
level (the latest round).
"""

from __future__ import annotations

import html
import io
import json

from lion_ray import storage
from lion_ray.rundir import RunDir

API_FIGURES = ("prompt_tokens", "completion_tokens", "cost_usd", "requests", "cached")
STAGE_ORDER = (
    "imitation.teacher",
    "imitation.train",
    "discrimination.teacher",
    "discrimination.student",
    "discrimination.referee",
    "discrimination.student_loss",
    "discrimination.learnability",
    "discrimination.random",
    "eval.heldout",
    "generation",
    "pools",
)

# loop.selection -> the stage that labels the Cache Pool
SELECTION_STAGES = {
    "referee": "referee",
    "student_loss": "student_loss",
    "learnability": "learnability",
    "random": "random",
}


def collect(run: RunDir, upto: int) -> dict:
    """Per-round figures for rounds 1..upto from the stage records and the stages' outputs."""
    stages = run.manifest.stages
    rounds = []
    for r in range(1, upto + 1):
        records = {s: stages.get(f"round_{r}/{s}") for s in STAGE_ORDER}

        def metrics(stage: str, records: dict = records) -> dict:
            rec = records[stage]
            return rec.metrics if rec else {}

        signature = [[k, rec.completed_at] for k, rec in sorted(records.items()) if rec]
        kept = run.round_path(r, "report", "round.json")
        if r < upto and storage.exists(kept):  # a finished round: computed once, then read
            saved = storage.read_json(kept)
            if saved.get("signature") == signature:
                rounds.append(saved["round"])
                continue
        judged_uri = run.round_path(r, "discrimination", "judged.parquet")
        teacher_scores, student_scores = score_histogram(judged_uri)
        api: dict[str, dict] = {}
        for rec in records.values():
            for role, used in (rec.api if rec else {}).items():
                acc = api.setdefault(role, dict.fromkeys(API_FIGURES, 0))
                for k in API_FIGURES:
                    acc[k] += getattr(used, k)
        discrimination = {"requests": 0, "cost_usd": 0.0, "cached": 0}
        for stage, rec in records.items():
            for used in (rec.api if rec and stage.startswith("discrimination.") else {}).values():
                for k in discrimination:
                    discrimination[k] += getattr(used, k)
        selection = next(
            (
                name
                for name, stage in SELECTION_STAGES.items()
                if records.get(f"discrimination.{stage}")
            ),
            None,
        )
        rows = {s: rec.rows for s, rec in records.items() if rec}
        rounds.append(
            {
                "round": r,
                "pools": metrics("pools").get("sizes")
                or {
                    "train": rows.get("imitation.teacher"),
                    "cache": rows.get("discrimination.teacher")
                    or rows.get("discrimination.random"),
                },
                "next_pools": metrics("pools").get("next"),
                "train": metrics("imitation.train"),
                "selection": selection,
                "split": metrics(f"discrimination.{SELECTION_STAGES.get(selection, 'referee')}"),
                "discrimination_api": discrimination,
                "generation": metrics("generation"),
                "heldout": metrics("eval.heldout") or None,
                "api": api,
                "seconds": {s: round(rec.seconds, 1) for s, rec in records.items() if rec},
                # where each stage's time went: engine compute, API waits, the rest
                "timing": {
                    s: {
                        "seconds": round(rec.seconds, 1),
                        "compute_s": None if rec.compute_s is None else round(rec.compute_s, 1),
                        "api_wait_s": round(rec.api_wait_s, 1),
                        "overhead_s": round(rec.overhead_s, 1),
                    }
                    for s, rec in records.items()
                    if rec
                },
                "teacher_scores": teacher_scores,  # {score: instructions}
                "student_scores": student_scores,
            }
        )
        storage.write_json(kept, {"signature": signature, "round": rounds[-1]})
    return {"run_dir": run.uri, "rounds": rounds}


def score_histogram(judged_uri: str) -> tuple[dict[str, int], dict[str, int]]:
    """How many instructions got each (teacher, student) referee score: read a window of
    two columns at a time, kept as counts (a round's report does not grow with its pool)."""
    from collections import Counter

    teacher: Counter = Counter()
    student: Counter = Counter()
    if storage.exists(judged_uri):
        columns = ["teacher_score", "student_score"]
        for window in storage.iter_windows(judged_uri, 100_000, columns):
            teacher.update(
                str(x) for x in window.column("teacher_score").to_pylist() if x is not None
            )
            student.update(
                str(x) for x in window.column("student_score").to_pylist() if x is not None
            )
    return dict(sorted(teacher.items())), dict(sorted(student.items()))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def plots(data: dict) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = data["rounds"]
    xs = [r["round"] for r in rounds]
    out: dict[str, bytes] = {}

    fig, ax = plt.subplots(figsize=(5, 3))
    width = 0.38
    ax.bar(
        [x - width / 2 for x in xs],
        [r["pools"].get("train") or 0 for r in rounds],
        width,
        label="Train Pool",
    )
    ax.bar(
        [x + width / 2 for x in xs],
        [r["pools"].get("cache") or 0 for r in rounds],
        width,
        label="Cache Pool",
    )
    ax.set(title="Pool sizes", xlabel="round", ylabel="instructions", xticks=xs)
    ax.legend()
    out["pools.png"] = _png(fig)

    last = rounds[-1]
    fig, ax = plt.subplots(figsize=(5, 3))
    bins = [i / 2 for i in range(2, 21)]
    for who in ("teacher", "student"):
        counts = last[f"{who}_scores"]
        ax.hist(
            [float(x) for x in counts],
            weights=list(counts.values()),
            bins=bins,
            alpha=0.6,
            label=who,
        )
    ax.set(
        title=f"Referee scores, round {last['round']}",
        xlabel="mean of both orders",
        ylabel="instructions",
    )
    ax.legend()
    out["scores.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(5, 3))
    for key, label in (
        ("hard_ratio", "hard ratio"),
        ("order_consistency", "order consistency"),
        ("parse_failure_rate", "parse failures"),
    ):
        ax.plot(xs, [r["split"].get(key, 0) for r in rounds], marker="o", label=label)
    ax.set(title="Discrimination", xlabel="round", ylim=(0, 1.05), xticks=xs)
    ax.legend()
    out["split.png"] = _png(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3))
    roles = sorted({role for r in rounds for role in r["api"]})
    bottom_t = [0.0] * len(xs)
    bottom_c = [0.0] * len(xs)
    for role in roles:
        tokens = [
            r["api"].get(role, {}).get("prompt_tokens", 0)
            + r["api"].get(role, {}).get("completion_tokens", 0)
            for r in rounds
        ]
        cost = [r["api"].get(role, {}).get("cost_usd", 0.0) for r in rounds]
        ax1.bar(xs, tokens, bottom=bottom_t, label=role)
        ax2.bar(xs, cost, bottom=bottom_c, label=role)
        bottom_t = [a + b for a, b in zip(bottom_t, tokens, strict=True)]
        bottom_c = [a + b for a, b in zip(bottom_c, cost, strict=True)]
    ax1.set(title="API tokens (paid calls)", xlabel="round", xticks=xs)
    ax2.set(title="API cost (USD)", xlabel="round", xticks=xs)
    ax1.legend()
    out["cost.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    bottom = [0.0] * len(xs)
    for stage in STAGE_ORDER:
        secs = [r["seconds"].get(stage, 0.0) for r in rounds]
        if any(secs):
            ax.bar(xs, secs, bottom=bottom, label=stage)
            bottom = [a + b for a, b in zip(bottom, secs, strict=True)]
    ax.set(title="Time per stage", xlabel="round", ylabel="seconds", xticks=xs)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    out["time.png"] = _png(fig)

    if any(r["heldout"] for r in rounds):
        families = sorted({f for r in rounds if r["heldout"] for f in r["heldout"]["by_family"]})
        fig, ax = plt.subplots(figsize=(8, 3))
        width = 0.8 / max(1, len(rounds))
        for i, r in enumerate(rounds):
            if r["heldout"]:
                vals = [r["heldout"]["by_family"].get(f, 0.0) for f in families]
                ax.bar(
                    [j + i * width for j in range(len(families))],
                    vals,
                    width,
                    label=f"round {r['round']} ({r['heldout']['accuracy']:.0%})",
                )
        ax.set_xticks(
            [j + width * (len(rounds) - 1) / 2 for j in range(len(families))], families, rotation=30
        )
        ax.set(
            title="Held-out sandbox accuracy by task family", ylabel="exact answers", ylim=(0, 1)
        )
        ax.legend()
        out["heldout.png"] = _png(fig)
    plt.close("all")
    return out


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{cells}</table>"


def _rounded(x, digits: int):
    return round(x, digits) if isinstance(x, float) else x


def round_summary(r: dict) -> dict:
    """The figures the per-round console table and the HTML page show (short keys: they are
    column headers)."""
    split, gen, api = r["split"], r["generation"], r["api"]
    return {
        "round": r["round"],
        "train": r["pools"].get("train"),
        "cache": r["pools"].get("cache"),
        "loss": _rounded(r["train"].get("loss_last"), 4),
        "hard": _rounded(split.get("hard_ratio"), 3),
        "t.score": _rounded(split.get("mean_teacher_score"), 2),
        "s.score": _rounded(split.get("mean_student_score"), 2),
        "agree": _rounded(split.get("order_consistency"), 3),
        "unparsed": split.get("unparsed"),
        "new": gen.get("new_instructions"),
        "att/new": _rounded(gen.get("attempts_per_accepted"), 2),
        "held-out": _rounded(r["heldout"]["accuracy"], 4) if r["heldout"] else None,
        "select": r.get("selection"),
        "disc req": r.get("discrimination_api", {}).get("requests"),
        "disc $": round(r.get("discrimination_api", {}).get("cost_usd", 0.0), 4),
        "cost $": round(sum(a.get("cost_usd", 0.0) for a in api.values()), 4),
        "s": round(sum(r["seconds"].values())),
    }


def generation_section(rounds: list[dict]) -> str:
    """Candidates, accepted and rejected by reason for every round, per family where the
    world has families, and the newest round's rejected examples beside their nearest
    neighbour: what the filter, rather than the selection, did to the new data."""
    reasons = sorted({k for r in rounds for k in r["generation"].get("rejected", {})})
    head = ["round", "candidates", "accepted", *reasons]
    rows = [
        [r["round"], r["generation"].get("candidates"), r["generation"].get("accepted")]
        + [r["generation"].get("rejected", {}).get(k, 0) for k in reasons]
        for r in rounds
    ]
    parts = ["<h2>Generation: what was kept, and why the rest was not</h2>", _grid(head, rows)]
    last = rounds[-1]["generation"]
    families = last.get("by_family")
    if families:
        fam_reasons = sorted({k for f in families.values() for k in f["rejected"]})
        parts.append(
            f"<h3>Round {rounds[-1]['round']} by task family</h3>"
            + _grid(
                ["family", "candidates", "accepted", "rejected share", *fam_reasons],
                [
                    [name, f["candidates"], f["accepted"], f["rejected_share"]]
                    + [f["rejected"].get(k, 0) for k in fam_reasons]
                    for name, f in families.items()
                ],
            )
        )
    examples = [
        [reason, e["instruction"], e.get("nearest", ""), e.get("similarity", "")]
        for reason, shown in last.get("examples", {}).items()
        for e in shown
    ]
    if examples:
        parts.append(
            f"<h3>Round {rounds[-1]['round']}: rejected examples</h3>"
            + _grid(["reason", "candidate", "nearest neighbour", "ROUGE-L F"], examples)
        )
    return "".join(parts)


def _grid(head: list, rows: list[list]) -> str:
    return (
        "<table><tr>"
        + "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
        + "</tr>"
        + "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
            for row in rows
        )
        + "</table>"
    )


def write_report(run: RunDir, round_no: int, name: str = "lion") -> str:
    """Build and write the report for rounds 1..round_no; returns the HTML page's URI."""
    data = collect(run, round_no)
    images = plots(data)
    summaries = [round_summary(r) for r in data["rounds"]]
    body = [
        f"<h1>{html.escape(name)}: Lion distillation report, round {round_no}</h1>",
        f"<p>Run directory: <code>{html.escape(run.uri)}</code></p>",
    ]
    head = list(summaries[0])
    body.append(_grid(head, [[s[h] for h in head] for s in summaries]))
    for img, title in (
        ("pools.png", "Pool sizes"),
        ("scores.png", "Score distributions"),
        ("split.png", "Hard ratio, order consistency, parse failures"),
        ("heldout.png", "Held-out accuracy"),
        ("cost.png", "Tokens and cost"),
        ("time.png", "Time per stage"),
    ):
        if img in images:
            body.append(f"<h2>{title}</h2><img src='{img}' alt='{title}'>")
    last = data["rounds"][-1]
    skipped = {
        k: v for k, v in run.manifest.data.skipped.items() if k.startswith(f"round_{round_no}/")
    }
    if skipped:
        names = ", ".join(k.split("/", 1)[1] for k in sorted(skipped))
        body.append(
            f"<p>Not run: {html.escape(names)}. {html.escape(next(iter(skipped.values())))}.</p>"
        )
    body.append(generation_section(data["rounds"]))
    body.append(
        f"<h3>Round {last['round']}'s generation figures</h3>"
        + _table([(k, json.dumps(v)) for k, v in last["generation"].items()])
    )
    timing = last["timing"]
    columns = ("seconds", "compute_s", "api_wait_s", "overhead_s")
    body.append(
        f"<h2>Where round {last['round']}'s time went</h2><table><tr><th>stage</th>"
        + "".join(f"<th>{c}</th>" for c in columns)
        + "</tr>"
        + "".join(
            f"<tr><td>{html.escape(stage)}</td>"
            + "".join(f"<td>{'' if t[c] is None else t[c]}</td>" for c in columns)
            + "</tr>"
            for stage, t in timing.items()
        )
        + "</table><p>compute: the training loop, inference and dedup; api_wait: some request "
        "in flight; overhead: the rest (engine start-up, loading, I/O).</p>"
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>lion-ray report</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:70em} table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;font-size:.9em} img{max-width:100%}"
        "</style></head><body>" + "".join(body) + "</body></html>"
    )
    report = {"summary": summaries, **data}
    for folder in (run.round_path(round_no, "report"), run.path("report")):
        for img, data_png in images.items():
            storage.write_bytes(storage.join(folder, img), data_png)
        storage.write_json(storage.join(folder, "report.json"), report)
        storage.write_text(storage.join(folder, "index.html"), page)
    return storage.join(run.round_path(round_no, "report"), "index.html")
