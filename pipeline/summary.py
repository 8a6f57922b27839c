"""The end-of-run console summary, rendered from the manifest (so resumed stages show too).

Stages may put two optional keys in their metrics for this: `summary` (a flat dict of headline
figures) and `table` ({"title", "columns", "rows"}), which is printed as a rich table.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_summary(console: Console, manifest: dict[str, Any]) -> None:
    stages = Table(title=f"run {manifest.get('recipe_name')}: {manifest.get('status')}", show_lines=False)
    for col in ("stage", "status", "time (s)", "headline"):
        stages.add_column(col)
    for s in manifest.get("stages", []):
        status = s["status"] + (" (resumed)" if s.get("resumed") else "")
        if s["status"] == "skipped":
            headline = f"skipped: {s.get('skip_reason')}"
        elif s.get("error"):
            headline = s["error"]
        else:
            headline = ", ".join(f"{k}={_fmt(v)}" for k, v in (s.get("metrics", {}).get("summary") or {}).items())
        stages.add_row(s["id"], status, _fmt(s["duration_s"]) if s["duration_s"] is not None else "-", headline)
    console.print(stages)
    for s in manifest.get("stages", []):
        table = s.get("metrics", {}).get("table")
        if isinstance(table, dict) and table.get("rows"):
            t = Table(title=table.get("title", s["id"]))
            for col in table.get("columns", []):
                t.add_column(str(col))
            for row in table["rows"]:
                t.add_row(*[_fmt(v) for v in row])
            console.print(t)
    gates = [g for s in manifest.get("stages", []) for g in s.get("gates", [])]
    if gates:
        t = Table(title="gates")
        for col in ("gate", "artifact", "value", "threshold", "result"):
            t.add_column(col)
        for g in gates:
            t.add_row(g["name"], str(g.get("artifact") or "-"), _fmt(g.get("value")), _fmt(g.get("threshold")),
                      "[green]pass[/]" if g["passed"] else "[red]FAIL[/]")
        console.print(t)
