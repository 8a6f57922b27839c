"""`fmap report RUN_DIR` and `fmap compare RUN_A RUN_B`: thin Click layers over pipeline.report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pipeline.errors import EXIT_GATE_FAILED, FmapError


class Regression(FmapError):
    """`fmap compare`: run B regresses run A beyond the tolerances. Exit 1, like a failed gate."""

    exit_code = EXIT_GATE_FAILED


@click.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", default="all", show_default=True, metavar="FORMAT",
              help="Which report to regenerate from manifest.json: md, html, json, junit, a plug-in's format, "
                   "or all.")
def report(run_dir: Path, fmt: str) -> None:
    """Regenerate the reports of RUN_DIR from its manifest.json."""
    from pipeline.report import write_reports

    for path in write_reports(run_dir, None if fmt == "all" else (fmt,)).values():
        click.echo(str(path))


@click.command("compare")
@click.argument("run_a", type=click.Path(path_type=Path))
@click.argument("run_b", type=click.Path(path_type=Path))
@click.option("--max-accuracy-drop", type=float, default=0.01, show_default=True,
              help="Absolute top-1 drop (0.01 = 1 point) from A to B tolerated.")
@click.option("--max-latency-increase", type=float, default=0.10, show_default=True,
              help="Relative p50 increase tolerated (only significant ones count: CIs must not overlap).")
@click.option("--max-size-increase", type=float, default=0.05, show_default=True,
              help="Relative artifact size increase tolerated.")
@click.option("--format", "out_format", type=click.Choice(["text", "md", "json"]), default="text", show_default=True,
              help="text: a table; md: a pull-request comment; json: machine-readable.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
def compare(run_a: Path, run_b: Path, max_accuracy_drop: float, max_latency_increase: float,
            max_size_increase: float, out_format: str, as_json: bool) -> None:
    """Show what changed from RUN_A to RUN_B; exit 1 if B regresses A beyond the tolerances."""
    from pipeline.report import load_manifest
    from pipeline.report.compare import compare_runs, require_finished

    manifest_a, manifest_b = load_manifest(run_a), load_manifest(run_b)
    require_finished(manifest_a, run_a)
    require_finished(manifest_b, run_b)
    result = compare_runs(manifest_a, manifest_b, max_accuracy_drop, max_latency_increase, max_size_increase)
    if as_json or out_format == "json":
        click.echo(json.dumps(result, indent=2, default=str))
    elif out_format == "md":
        from pipeline.report.compare import render_compare_markdown

        click.echo(render_compare_markdown(result), nl=False)
    else:
        _render(result)
    if result["regressed"]:
        raise Regression(f"{run_b} regresses {run_a}: " + "; ".join(result["regressions"]))


def _render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from pipeline.report import fmt

    console = Console(width=None if sys.stdout.isatty() else 200)  # pipes/CI: don't squeeze the table
    table = Table(title=f"{result['run_a']} → {result['run_b']}")
    for col in ("artifact", "backend", "accuracy A → B", "p50 A [CI]", "p50 B [CI]", "speedup A → B",
                "Δ latency (within-run)", "size A → B", ""):
        table.add_column(col)
    for d in result["artifacts"]:
        lat = "n/a" if d["latency_change"] is None else f"{100 * d['latency_change']:+.1f}%" + (
            "" if d["latency_change_significant"] else " (n.s.)")
        if d["latency_basis"] == "absolute_p50":
            lat += " (absolute)"
        table.add_row(d["artifact"], d["backend"], f"{fmt.pct(d['accuracy_a'])} → {fmt.pct(d['accuracy_b'])}",
                      fmt.ms_ci(d["p50_ms_a"], d["p50_ci95_a"]), fmt.ms_ci(d["p50_ms_b"], d["p50_ci95_b"]),
                      f"{fmt.ratio_ci(d['speedup_a'], None)} → {fmt.ratio_ci(d['speedup_b'], None)}", lat,
                      f"{fmt.size(d['size_bytes_a'])} → {fmt.size(d['size_bytes_b'])}",
                      "unchanged" if d["unchanged"] else ("REGRESSED" if d["regressions"] else "ok"))
    console.print(table)
    pm = result["peak_memory_bytes"]
    console.print(f"peak activation memory: {fmt.size(pm['a'])} → {fmt.size(pm['b'])}")
    for c in result["channels"]:
        console.print(f"channels {c['layer']}: {c['a']} → {c['b']}")
    for side in ("only_in_a", "only_in_b"):
        if result[side]:
            console.print(f"{side.replace('_', ' ')}: {', '.join(result[side])}")
    for r in result["regressions"]:
        console.print(f"[red]regression: {r}[/red]")
