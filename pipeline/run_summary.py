"""The end-of-run console summary, rendered from the same report dict as report.md/html/json, so
the console never disagrees with the files: per-layer feature maps, stages, artifacts, gates."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.report import fmt
from pipeline.report.document import build_report
from pipeline.report.markdown import key_numbers

MAX_LAYER_ROWS = 40  # beyond this, the largest feature maps are shown (all are in report.html)


def print_summary(console: Console, manifest: dict[str, Any]) -> None:
    report = build_report(manifest)
    for st in report["stages"]:
        if st["kind"] == "profile" and st["status"] != "skipped":
            print_layer_table(console, st["metrics"].get("layers") or [], title=f"feature maps ({st['id']})")
    stages = Table(title=f"run {report['recipe_name']}: {report['status']}")
    for col in ("stage", "status", "time", "key numbers"):
        stages.add_column(col)
    for st in report["stages"]:
        raw = next((s for s in manifest.get("stages", []) if s["id"] == st["id"]), {})
        status = st["status"] + (" (resumed)" if raw.get("resumed") else "")
        dur = f"{raw['duration_s']:.1f} s" if raw.get("duration_s") is not None else "-"
        stages.add_row(st["id"], status, dur, escape(raw.get("error") or key_numbers(st)))
    console.print(stages)
    if report["artifacts"]:
        t = Table(title="artifacts (speedup and latency at batch %s, 95%% CI)" % report["artifacts"][0]["batch_size"])
        for col in ("artifact", "backend", "top-1", "agreement", "p50 latency", "speedup vs original",
                    "vs same-runtime FP32", "size"):
            t.add_column(col)
        for r in report["artifacts"]:
            t.add_row(r["artifact"] + (" *" if r["deployable"] else ""), r["backend"], fmt.pct(r["top1"]),
                      fmt.pct(r["agreement"]), fmt.ms_ci(r["p50_ms"], r["p50_ci95_ms"]),
                      fmt.ratio_ci(r["speedup"], r["speedup_ci95"]),
                      fmt.ratio_ci(r.get("speedup_fp32"), r.get("speedup_fp32_ci95")), fmt.size(r["size_bytes"]))
        console.print(t)
        machine = report.get("machine") or {}
        if machine.get("busy"):
            from pipeline.report.markdown import busy_text

            console.print(f"[yellow]warning: busy machine: {escape(busy_text(machine))}; latency numbers may be "
                          "biased[/yellow]")
    for u in report["unavailable"]:
        console.print(f"[yellow]not measured[/] {escape(str(u.get('artifact') or 'all artifacts'))} on "
                      f"{escape(str(u.get('backend')))}: {escape(str(u.get('reason')))}")
    if report["gates"]:
        t = Table(title="gates")
        for col in ("gate", "artifact", "value", "threshold", "result"):
            t.add_column(col)
        for g in report["gates"]:
            t.add_row(g["name"], str(g.get("artifact") or "-"), fmt.num(g.get("value")), fmt.num(g.get("threshold")),
                      "[green]pass[/]" if g["passed"] else "[red]FAIL[/]")
        console.print(t)


def print_layer_table(console: Console, layers: list[dict[str, Any]], title: str = "feature maps") -> None:
    """Per-layer name, type, output shape, volume H·W·C, bytes, params, MACs, receptive field."""
    rows = layers
    note = ""
    if len(layers) > MAX_LAYER_ROWS:
        rows = sorted(layers, key=lambda r: -(r.get("bytes") or 0))[:MAX_LAYER_ROWS]
        order = {id(r): i for i, r in enumerate(layers)}
        rows.sort(key=lambda r: order[id(r)])
        note = f" — the {MAX_LAYER_ROWS} largest of {len(layers)} layers; all in report.html"
    t = Table(title=title + note)
    for col, justify in (("layer", "left"), ("type", "left"), ("output", "left"), ("volume", "right"),
                         ("bytes", "right"), ("params", "right"), ("MACs", "right"), ("RF", "right")):
        t.add_column(col, justify=justify)
    for r in rows:
        shape = "x".join(str(d) for d in (r.get("output_shape") or []))
        t.add_row(str(r.get("name")), str(r.get("type")), shape, fmt.num(r.get("volume")), fmt.size(r.get("bytes")),
                  fmt.num(r.get("params")), fmt.num(r.get("macs")), fmt.num(r.get("receptive_field")))
    console.print(t)
