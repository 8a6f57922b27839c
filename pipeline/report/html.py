"""report.html: ONE self-contained file. Inline CSS, plots as base64 PNG, no scripts, no network.

Sections: verdict, artifacts (accuracy/latency/size), gates, not-measured pairs, stages (skipped ones
with their reason), profile per-layer table + memory timeline + redundancy, pruning per layer,
quantization error, plot artifacts from the run, environment.

The page is the Jinja2 template `templates/report.html.j2` (autoescaped; CSS from
`templates/report.css`, inlined); this module only turns report.json into the values it shows.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.report import fmt, plots, report_format

CSS = resources.files("pipeline.report").joinpath("templates/report.css").read_text(encoding="utf-8")

# Plot artifacts whose content the stage's section already draws from report.json: inlining the
# stage's PNG as well would show the same plot twice.
DRAWN_INLINE = {"profile": {"plot_memory_timeline", "plot_redundancy"}, "prune": {"prune_channels"}}
GATE_TEXT = {"pass": "pass", "fail": "FAIL", "none": "–"}


@lru_cache(maxsize=1)
def _template() -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template("report.html.j2")


@report_format("html", "report.html")
def render_html(report: dict[str, Any], run_dir: Path | None = None) -> str:
    from pipeline.report.markdown import busy_text, noise_floor_text

    state, verdict = fmt.verdict(report)
    machine = report.get("machine") or {}
    busy = busy_text(machine) if machine.get("busy") else None
    return _template().render(
        r=report, css=CSS, title=report.get("recipe_name") or "run", state=state,
        verdict=verdict[0].upper() + verdict[1:], busy=busy, noise_floor=noise_floor_text(report),
        artifacts=_artifacts(report["artifacts"]),
        unavailable=report["unavailable"], gates=_gates(report["gates"]), stages=_stages(report["stages"]),
        sections_=[s for s in map(_section, report["stages"]) if s is not None],
        plots=_plot_artifacts(report, run_dir),
        environment=json.dumps(report.get("environment") or {}, indent=1, default=str))


def _artifacts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"rows": []}
    head = ["artifact", "backend", "precision", "top-1", "top-5", "agreement", "max |err|",
            f"p50 (batch {rows[0]['batch_size']}) [95% CI]", "p99", "throughput", "speedup vs original [95% CI]",
            "speedup vs same-runtime FP32 [95% CI]", "size", "RSS delta", "gates"]
    return {"head": head, "rows": [_artifact_row(r) for r in rows], "latency_img": plots.latency(rows)}


def _artifact_row(r: dict[str, Any]) -> list[Any]:
    name = r["artifact"] + (" (baseline)" if r["baseline"] else "") + (" (deployable)" if r["deployable"] else "")
    fp32 = None if r.get("speedup_fp32") is None else (
        f"{fmt.ratio_ci(r['speedup_fp32'], r.get('speedup_fp32_ci95'))} vs {r.get('speedup_fp32_vs')}")
    return [name, r["backend"], r.get("precision"), fmt.pct(r["top1"]), fmt.pct(r["top5"]),
            fmt.pct(r["agreement"]), fmt.num(r["max_abs_err"]),
            fmt.ms_ci(r["p50_ms"], r["p50_ci95_ms"]) if not r.get("error") else f"error: {r['error']}",
            fmt.ms_ci(r["p99_ms"], None),
            "n/a" if r["throughput_ips"] is None else f"{r['throughput_ips']:.1f}/s",
            fmt.ratio_ci(r["speedup"], r["speedup_ci95"]), fp32 or "n/a", fmt.size(r["size_bytes"]),
            "n/a" if r["rss_delta_mb"] is None else f"{r['rss_delta_mb']:.1f} MB",
            {"cls": r["gate_status"], "text": GATE_TEXT[r["gate_status"]]}]


def _gates(gates: list[dict[str, Any]]) -> list[list[Any]]:
    return [[g["name"], g.get("artifact") or "-", fmt.gate_value(g), f"{fmt.gate_op(g['name'])} {g['threshold']}",
             {"cls": "pass" if g["passed"] else "fail", "text": "pass" if g["passed"] else "FAIL"},
             g.get("detail")] for g in gates]


def _stages(stages: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for st in stages:
        note = {"skipped": f"skipped: {st.get('skip_reason') or 'no reason given'}",
                "failed": f"failed: {st.get('error') or ''}", "pending": "did not run"}.get(st["status"], "")
        cls = "skipped" if st["status"] in ("skipped", "pending") else ("fail" if st["status"] == "failed" else "")
        dur = "n/a" if st.get("duration_s") is None else f"{st['duration_s']:.2f} s"
        rows.append([st["id"], st["kind"], {"cls": cls, "text": st["status"]}, dur, {"cls": cls, "text": note}])
    return rows


def _section(st: dict[str, Any]) -> dict[str, Any] | None:
    """The view of a finished stage's own section (None: the stage has none)."""
    if st["status"] not in ("ok", "resumed"):
        return None
    if st["kind"] in ("export", "visualize"):
        return {"macro": "generic", "id": st["id"], "title": st["kind"].capitalize(),
                "metrics": json.dumps(st["metrics"], indent=1, default=str)[:20000]}
    build = {"profile": _profile, "prune": _prune, "quantize": _quantize}.get(st["kind"])
    return None if build is None else {"macro": st["kind"], "id": st["id"], **build(st["metrics"])}


def _profile(m: dict[str, Any]) -> dict[str, Any]:
    from pipeline.profiling.model_profile import LAYER_COLUMNS, layer_rows

    mem = m.get("memory") or {}
    red = m.get("redundancy") or {}
    red_rows = [dict(layer=k, **{a: b for a, b in v.items() if not isinstance(b, (list, dict))})
                for k, v in red.items() if isinstance(v, dict)]
    layers = [r for r in m.get("layers") or [] if isinstance(r, dict)]
    return {"totals": _pairs(m.get("totals") or {}),
            "layers": {"id": "layers", "cols": list(LAYER_COLUMNS), "rows": layer_rows(layers[:1000]),
                       "more": max(0, len(layers) - 1000)},
            "memory": _pairs({k: v for k, v in mem.items() if not isinstance(v, (list, dict))}),
            "timeline_img": plots.memory_timeline(m.get("timeline"), mem.get("peak_at")),
            "redundancy": _dict_table(red_rows, None, "redundancy") if red else None,
            "redundancy_img": plots.redundancy(red) if red else None}


def _prune(m: dict[str, Any]) -> dict[str, Any]:
    before, after = m.get("before") or {}, m.get("after") or {}
    keys = list(dict.fromkeys([*before, *after]))
    table = {"head": ["", *keys], "rows": [["before", *(fmt.num(before.get(k)) for k in keys)],
                                           ["after", *(fmt.num(after.get(k)) for k in keys)]]} if keys else None
    accuracy = {k: fmt.pct(v) if isinstance(v, float) else v for k, v in (m.get("accuracy") or {}).items()}
    return {"before_after": table, "accuracy": _pairs(accuracy), "channels_img": plots.pruning(m.get("layers")),
            "layers": _dict_table(m.get("layers"), None, "prune-layers"),
            "left_alone": ", ".join(_named(x) for x in m.get("left_alone") or [])}


def _named(item: Any) -> str:
    """`{'name': 'fc', 'reason': '...'}` -> `fc (...)`: prose, not a Python dict."""
    if isinstance(item, dict):
        name = item.get("name") or item.get("layer") or "?"
        rest = "; ".join(f"{v}" if k == "reason" else f"{k} {v}" for k, v in item.items() if k not in ("name", "layer"))
        return f"{name} ({rest})" if rest else str(name)
    return str(item)


def _with_module(rows: Any) -> Any:
    """Lead each error row with the torch module path its ONNX node came from (`/layer1/layer1.0/conv1/Conv`
    -> `layer1.0.conv1`), so a row names something the user wrote, not `onnx::Conv_64`."""
    from pipeline.profiling.onnx_graph import module_path

    if not isinstance(rows, list):
        return rows
    out = []
    for r in rows:
        if isinstance(r, dict):
            where = r.get("layer") or r.get("tensor") or ""
            r = {"module": module_path(str(where)) if "/" in str(where) else where, **r}
        out.append(r)
    return out


def _quantize(m: dict[str, Any]) -> dict[str, Any]:
    fb = m.get("fallback") or {}
    steps = [{"step": s.get("step"), "float layers": ", ".join(s.get("float_layers") or []) or "none",
              "accuracy": fmt.pct(s.get("accuracy")), "agreement": fmt.pct(s.get("agreement")),
              "kept": "yes" if s.get("accepted", True) else "undone"} for s in fb.get("steps") or []]
    fallback = {"fallback steps": len(fb.get("steps") or []),
                "layers kept float": ", ".join(map(str, fb.get("float_layers") or [])) or "none"}
    return {"target": _pairs(_target(m.get("target") or {})), "fallback": _pairs(fallback) if fb else None,
            "fallback_steps": _dict_table(steps, None, "fallback-steps"),
            "errors_img": plots.layer_errors(m.get("layer_errors")),
            "errors": _dict_table(_with_module(m.get("layer_errors")), None, "quant-errors")}


def _target(tgt: dict[str, Any]) -> dict[str, Any]:
    """The quantize target block: what ran where, and what the overflow fix changed."""
    if not tgt:
        return {}
    sat = tgt.get("saturation") or {}
    host = tgt.get("host") or {}
    widened = ", ".join(f"{k} ({v.get('channels')}/{v.get('of')} channels, up to {v.get('max_factor')}x)"
                        for k, v in (tgt.get("widened_channels") or {}).items())
    return {"target": f"{tgt.get('resolved')} (asked: {tgt.get('requested')})",
            "this machine": f"{host.get('target')}, {host.get('model')}",
            "accuracy measured on target kernels": "yes" if tgt.get("measured_on_target") else "no: not measured here",
            "exact on": ", ".join(tgt.get("safe_on") or []),
            "layers that can saturate int16 without VNNI": ", ".join(sat.get("layers_at_risk") or []) or "none",
            "overflow fix: widened weight scales": widened or "none",
            "overflow fix: 7-bit weights": ", ".join(tgt.get("seven_bit_weights") or []) or "none"}


def _plot_artifacts(report: dict[str, Any], run_dir: Path | None) -> list[dict[str, Any]]:
    """PNG plot artifacts that stages wrote into the run directory, inlined."""
    out = []
    for st in report["stages"] if run_dir is not None else []:
        for name, a in (st.get("artifacts") or {}).items():
            if not isinstance(a, dict) or a.get("kind") != "plot" or name in DRAWN_INLINE.get(st["kind"], ()):
                continue  # not a plot, or already drawn in the stage's own section
            path = Path(run_dir) / str(a.get("path"))
            found = path.suffix.lower() == ".png" and path.is_file()
            out.append({"stage": st["id"], "name": name, "description": a.get("description"), "path": a.get("path"),
                        "b64": base64.b64encode(path.read_bytes()).decode("ascii") if found else None})
    return out


def _dict_table(rows: Any, cols: list[str] | None, table_id: str, limit: int = 1000) -> dict[str, Any]:
    rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))
    return {"id": table_id, "cols": cols, "rows": [[_cell(r.get(c)) for c in cols] for r in rows[:limit]],
            "more": max(0, len(rows) - limit)}


def _pairs(d: dict[str, Any]) -> list[list[str]]:
    return [[k, _cell(v)] for k, v in d.items()]


def _cell(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "×".join(map(str, v)) if all(isinstance(x, int) for x in v) else json.dumps(v, default=str)
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    return fmt.num(v)
