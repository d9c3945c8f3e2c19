"""`lion-ray status`: what a run has done, read from its manifest."""

from __future__ import annotations

from rich import box
from rich.table import Table

from lion_ray.storage import RunDir


def _notes(info: dict) -> str:
    m = info.get("metrics") or {}
    notes = []
    if "hard_ratio" in m:
        notes.append(f"hard {m['hard_ratio']:.0%} unparsed {m.get('unparsed', 0)}")
    if "accuracy" in m:
        notes.append(f"accuracy {m['accuracy']:.1%}")
    if m.get("loss_last") is not None:
        notes.append(f"loss {m['loss_first']:.2f}->{m['loss_last']:.2f}")
    if "new_instructions" in m:
        notes.append(f"new {m['new_instructions']} rejected {sum(m.get('rejected', {}).values())}")
    cached = sum(a.get("cached", 0) for a in info.get("api", {}).values())
    if cached:
        notes.append(f"cached {cached}")
    return ", ".join(notes)


def status_table(run_uri: str) -> tuple[Table, dict]:
    run = RunDir(run_uri)
    data = run.manifest.data
    current = data.get("current_stage")
    title = run.uri + (f" (running: {current})" if current else "")
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("round", "stage", "rows", "failed", "tokens", "$", "s", "notes"):
        justify = "left" if col in ("stage", "notes") else "right"
        table.add_column(col, justify=justify, no_wrap=col != "notes")
    total_cost = total_tokens = 0
    for key, info in sorted(data["stages"].items(), key=lambda kv: kv[1].get("completed_at", 0)):
        round_no, _, stage = key.rpartition("/")
        api = info.get("api", {}).values()
        tokens = sum(a.get("prompt_tokens", 0) + a.get("completion_tokens", 0) for a in api)
        cost = sum(a.get("cost_usd", 0.0) for a in api)
        total_cost += cost
        total_tokens += tokens
        table.add_row(
            round_no.removeprefix("round_"),
            stage,
            str(info.get("rows", "")),
            str(info.get("failed", "")),
            f"{tokens:,}" if tokens else "",
            f"{cost:.4f}" if cost else "",
            f"{info.get('seconds', 0):.0f}",
            _notes(info),
        )
    table.caption = (
        f"{len(data['stages'])} stages done, {total_tokens:,} API tokens, ${total_cost:.4f}"
    )
    return table, data
