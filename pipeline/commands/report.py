"""`fmap report RUN_DIR` and `fmap compare RUN_A RUN_B [RUN_C ...]`: thin Click layers over pipeline.report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from pipeline.errors import EXIT_GATE_FAILED, BadInput, FmapError


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
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--max-accuracy-drop", type=float, default=0.01, show_default=True,
              help="Absolute top-1 drop (0.01 = 1 point) from A to B tolerated.")
@click.option("--max-latency-increase", type=float, default=0.10, show_default=True,
              help="Relative p50 increase tolerated (only significant ones count: CIs must not overlap).")
@click.option("--max-size-increase", type=float, default=0.05, show_default=True,
              help="Relative artifact size increase tolerated.")
@click.option("--format", "out_format", type=click.Choice(["text", "md", "json"]), default="text", show_default=True,
              help="text: a table; md: a pull-request comment; json: machine-readable.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
def compare(runs: tuple[Path, ...], max_accuracy_drop: float, max_latency_increase: float,
            max_size_increase: float, out_format: str, as_json: bool) -> None:
    """Show what changed from the first run to each other; exit 1 if any regresses the first beyond the
    tolerances. Two runs: A -> B in detail; more: one table over all runs (docs/report-schema.md)."""
    from pipeline.report import load_manifest
    from pipeline.report.compare import compare_runs, require_finished

    if len(runs) < 2:
        raise BadInput("fmap compare needs at least two run directories (the first is the reference)")
    manifests = [load_manifest(r) for r in runs]
    for m, r in zip(manifests, runs):
        require_finished(m, r)
    if len(runs) > 2:
        return _compare_many(runs, manifests, out_format, as_json, max_accuracy_drop=max_accuracy_drop,
                             max_latency_increase=max_latency_increase, max_size_increase=max_size_increase)
    from pipeline.report.compare import render_compare_markdown

    run_a, run_b = runs
    result = compare_runs(manifests[0], manifests[1], max_accuracy_drop, max_latency_increase, max_size_increase)
    _emit(result, "json" if as_json else out_format, render_compare_markdown, _render, f"{run_b} regresses {run_a}")


def _compare_many(runs: tuple[Path, ...], manifests: list[dict], out_format: str, as_json: bool,
                  **tolerances: float) -> None:
    from pipeline.report.compare_many import compare_many, render_many_markdown

    result = compare_many(manifests, [str(r) for r in runs], **tolerances)
    _emit(result, "json" if as_json else out_format, render_many_markdown, _render_many,
          f"{len(result['regressions'])} regression(s) against {runs[0]}")


def _emit(result: dict, out_format: str, markdown: Any, text: Any, verdict: str) -> None:
    """Print a comparison in its format; a regression is exit 1 (Regression) after it is printed."""
    if out_format == "json":
        click.echo(json.dumps(result, indent=2, default=str))
    elif out_format == "md":
        click.echo(markdown(result), nl=False)
    else:
        text(result)
    if result["regressed"]:
        raise Regression(f"{verdict}: " + "; ".join(result["regressions"]))


def _render_many(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from pipeline.report.compare_many import cell_text

    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=f"{len(result['runs'])} runs, each against {result['reference']} "
                        "(accuracy · speedup · size)")
    for col in ("artifact", "backend", *result["runs"]):
        table.add_column(col)
    for row in result["rows"]:
        table.add_row(row["artifact"], row["backend"],
                      *(cell_text(c) + (" REGRESSED" if bad else "") for c, bad in zip(row["cells"], row["regressed"])))
    console.print(table)
    for r in result["regressions"]:
        console.print(f"[red]regression: {r}[/red]")


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
