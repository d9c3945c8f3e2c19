"""`lion-ray status`: what a run has done (its stage records) and spent (its ledgers)."""

from __future__ import annotations

from rich import box
from rich.table import Table

from lion_ray import storage
from lion_ray.engines import ledger
from lion_ray.logic.accounting import SpendTotals
from lion_ray.rundir import RunDir, StageRecord

ROLES = ("teacher", "referee", "generator")


def _notes(rec: StageRecord) -> str:
    m = rec.metrics
    notes = []
    if "hard_ratio" in m:
        notes.append(f"hard {m['hard_ratio']:.0%} unparsed {m.get('unparsed', 0)}")
    if "accuracy" in m:
        notes.append(f"accuracy {m['accuracy']:.1%}")
    if m.get("loss_last") is not None:
        notes.append(f"loss {m['loss_first']:.2f}->{m['loss_last']:.2f}")
    if "new_instructions" in m:
        notes.append(f"new {m['new_instructions']} rejected {sum(m.get('rejected', {}).values())}")
        if m.get("attempts_per_accepted"):
            notes.append(f"{m['attempts_per_accepted']:.2f} attempts/new")
    cached = sum(a.cached for a in rec.api.values())
    if cached:
        notes.append(f"cached {cached}")
    return ", ".join(notes)


def spend(run: RunDir) -> dict[str, dict]:
    """Per role: what its ledger says was spent (in-flight requests at their worst case),
    and how much of it the stage now running accounts for."""
    current = run.manifest.data.current_stage
    out = {}
    for role in ROLES:
        uri = run.ledger_dir(role)
        if storage.exists(uri):
            totals = ledger.load(uri)
        elif storage.exists(run.cache_dir(role)):  # a run from before the ledger (0.1.0)
            legacy = ledger.legacy_spend(run.cache_dir(role), run.recorded_spend(role))
            totals = SpendTotals(settled_usd=legacy)
        else:
            continue
        out[role] = {
            "spent_usd": round(totals.spent_usd, 6),
            "in_flight_usd": round(totals.open_usd, 6),
            "current_stage_usd": round(totals.spent_by_stage().get(current, 0.0), 6)
            if current
            else 0.0,
        }
    return out


def discrimination(run: RunDir) -> dict[int, dict]:
    """Per round: the selection used and the API calls and cost its stages made."""
    out: dict[int, dict] = {}
    for rec in run.manifest.data.stages.values():
        if rec.round is None or not rec.stage.startswith("discrimination."):
            continue
        acc = out.setdefault(rec.round, {"selection": "referee", "requests": 0, "cost_usd": 0.0})
        kind = rec.stage.removeprefix("discrimination.")
        if kind in ("student_loss", "learnability", "random"):
            acc["selection"] = kind
        acc["requests"] += sum(a.requests for a in rec.api.values())
        acc["cost_usd"] = round(acc["cost_usd"] + rec.cost_usd, 6)
    return dict(sorted(out.items()))


def generation(run: RunDir) -> dict[int, dict]:
    """Per round: the generator's candidates, how many were accepted, and why the rest were
    rejected (the filter, not the selection, may be what shapes the data)."""
    out: dict[int, dict] = {}
    for rec in run.manifest.data.stages.values():
        if rec.round is None or rec.stage != "generation":
            continue
        m = rec.metrics
        out[rec.round] = {
            k: m[k]
            for k in ("candidates", "accepted", "rejected", "rejected_share", "by_family")
            if k in m
        }
    return dict(sorted(out.items()))


def generation_line(metrics: dict) -> str:
    """'generation: 64 of 130 candidates accepted; rejected: similar_to_pool 50, ...'"""
    rejected = metrics.get("rejected") or {}
    return f"generation: {metrics['accepted']} of {metrics['candidates']} candidates accepted" + (
        "; rejected: " + ", ".join(f"{k} {n}" for k, n in rejected.items()) if rejected else ""
    )


def status_table(run_uri: str) -> tuple[Table, dict]:
    run = RunDir(run_uri)
    data = run.manifest.data
    current = data.current_stage
    title = run.uri + (f" (running: {current})" if current else "")
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("round", "stage", "rows", "failed", "tokens", "$", "s", "notes"):
        justify = "left" if col in ("stage", "notes") else "right"
        table.add_column(col, justify=justify, no_wrap=col != "notes")
    total_tokens = 0
    for rec in sorted(data.stages.values(), key=lambda rec: rec.completed_at):
        total_tokens += rec.tokens
        table.add_row(
            str(rec.round or ""),
            rec.stage,
            str(rec.rows),
            str(rec.failed),
            f"{rec.tokens:,}" if rec.tokens else "",
            f"{rec.cost_usd:.4f}" if rec.cost_usd else "",
            f"{rec.seconds:.0f}",
            _notes(rec),
        )
    spent = spend(run)
    by_role = ", ".join(
        f"{role} ${s['spent_usd']:.4f}"
        + (f" (${s['current_stage_usd']:.4f} in {current})" if s["current_stage_usd"] else "")
        for role, s in spent.items()
    )
    total = sum(s["spent_usd"] for s in spent.values())
    per_round = discrimination(run)
    per_round_generation = generation(run)
    table.caption = (
        f"{len(data.stages)} stages done, {total_tokens:,} API tokens in them; "
        f"spent ${total:.4f} over the whole run"
        + (f": {by_role}" if by_role else "")
        + "".join(
            f"\nround {r} discrimination ({d['selection']}): "
            f"{d['requests']:,} API requests, ${d['cost_usd']:.4f}"
            for r, d in per_round.items()
        )
        + "".join(
            f"\nround {r} {generation_line(g)}"
            for r, g in per_round_generation.items()
            if "candidates" in g
        )
    )
    if data.skipped:
        why = next(iter(data.skipped.values()))
        table.caption += f"\nskipped {', '.join(sorted(data.skipped))}: {why}"
    for key, failure in sorted(data.failures.items()):
        first_line = failure.error.strip().splitlines()[0] if failure.error.strip() else ""
        table.caption += (
            f"\nFAILED {key} (attempt {failure.attempts}; rerun to retry it): {first_line[:300]}"
        )
    return table, data.model_dump(mode="json") | {
        "spend": spent,
        "spent_usd": round(total, 6),
        "discrimination": {str(r): d for r, d in per_round.items()},
        "generation": {str(r): g for r, g in per_round_generation.items()},
    }
