"""report.html: ONE self-contained file. Inline CSS, plots as base64 PNG, no scripts, no network.

Sections: verdict, artifacts (accuracy/latency/size), gates, not-measured pairs, stages (skipped ones
with their reason), profile per-layer table + memory timeline + redundancy, pruning per layer,
quantization error, plot artifacts from the run, environment.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from pipeline.report import fmt, plots, report_format

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#176f2c;font-weight:600}.fail{color:#b00020;font-weight:600}.skipped{color:#8a6d00}
.banner{padding:.6em 1em;border-radius:6px;font-weight:600}.banner.pass{background:#e6f4ea}.banner.fail{background:#fdecea}
.banner.none{background:#f1f1f1;color:#444}
#summary td,#gates td:not(:last-child),td.num{white-space:nowrap}.wide{overflow-x:auto}
img{max-width:100%;border:1px solid #eee}details{margin:.4em 0}.scroll{max-height:480px;overflow:auto}
"""


# Plot artifacts whose content the stage's section already draws from report.json: inlining the
# stage's PNG as well would show the same plot twice.
DRAWN_INLINE = {"profile": {"plot_memory_timeline", "plot_redundancy"}, "prune": {"prune_channels"}}


@report_format("html", "report.html")
def render_html(report: dict[str, Any], run_dir: Path | None = None) -> str:
    state, verdict = fmt.verdict(report)
    parts = [f"<h1>fmap report: {_e(report.get('recipe_name') or 'run')}</h1>",
             f'<p class="banner {state}" id="verdict">{_e(verdict[0].upper() + verdict[1:])}</p>',
             f"<p>status <b>{_e(report['status'])}</b> · exit code {_e(report.get('exit_code'))} · fmap "
             f"{_e(report.get('fmap_version'))} · started {_e(report.get('started'))} · finished "
             f"{_e(report.get('finished'))}</p>"]
    if (report.get("machine") or {}).get("busy"):
        from pipeline.report.markdown import busy_text

        parts.append(f'<p class="banner fail" id="busy">Busy machine: {_e(busy_text(report["machine"]))}. '
                     "Latencies and speedups were measured under load and may be biased.</p>")
    parts += _artifacts(report)
    parts += _gates(report)
    parts += _stages(report)
    for st in report["stages"]:
        if st["status"] not in ("ok", "resumed"):
            continue
        if st["kind"] == "profile":
            parts += _profile(st)
        elif st["kind"] == "prune":
            parts += _prune(st)
        elif st["kind"] == "quantize":
            parts += _quantize(st)
        elif st["kind"] == "export":
            parts += _generic(st, "Export")
        elif st["kind"] == "visualize":
            parts += _generic(st, "Visualize")
    parts += _plot_artifacts(report, run_dir)
    env = report.get("environment") or {}
    parts += ["<h2>Environment</h2>", f"<pre>{_e(json.dumps(env, indent=1, default=str))}</pre>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>fmap report: {_e(report.get('recipe_name') or 'run')}</title><style>{CSS}</style></head>"
            "<body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _artifacts(report: dict[str, Any]) -> list[str]:
    rows = report["artifacts"]
    out = ["<h2>Artifacts: accuracy, latency, size</h2>"]
    if not rows:
        out.append("<p>No verify measurements in this run.</p>")
    else:
        bs = rows[0]["batch_size"]
        head = ["artifact", "backend", "precision", "top-1", "top-5", "agreement", "max |err|",
                f"p50 (batch {bs}) [95% CI]", "p99", "throughput", "speedup vs original [95% CI]",
                "speedup vs same-runtime FP32 [95% CI]", "size", "RSS delta", "gates"]
        body = []
        for r in rows:
            name = r["artifact"] + (" (baseline)" if r["baseline"] else "") + (" (deployable)" if r["deployable"] else "")
            gate = r["gate_status"]
            body.append([_e(name), _e(r["backend"]), _e(r.get("precision")), fmt.pct(r["top1"]), fmt.pct(r["top5"]),
                         fmt.pct(r["agreement"]), fmt.num(r["max_abs_err"]),
                         _e(fmt.ms_ci(r["p50_ms"], r["p50_ci95_ms"]) if not r.get("error") else f"error: {r['error']}"),
                         fmt.ms_ci(r["p99_ms"], None),
                         "n/a" if r["throughput_ips"] is None else f"{r['throughput_ips']:.1f}/s",
                         fmt.ratio_ci(r["speedup"], r["speedup_ci95"]),
                         "n/a" if r.get("speedup_fp32") is None else _e(
                             f"{fmt.ratio_ci(r['speedup_fp32'], r.get('speedup_fp32_ci95'))} vs {r.get('speedup_fp32_vs')}"),
                         fmt.size(r["size_bytes"]),
                         "n/a" if r["rss_delta_mb"] is None else f"{r['rss_delta_mb']:.1f} MB",
                         f'<span class="{gate}">{ {"pass": "pass", "fail": "FAIL", "none": "–"}[gate] }</span>'])
        out.append(f'<div class="wide">{_table(head, body, raw=True, table_id="summary")}</div>')
        img = plots.latency(rows)
        if img:
            out.append(_img(img, "latency per artifact"))
    if report["unavailable"]:
        out.append("<h3>Not measured</h3><ul>" + "".join(
            f"<li class=\"skipped\">{_e(u.get('artifact') or 'all artifacts')} on {_e(u.get('backend') or '-')}: "
            f"{_e(u.get('reason'))}</li>" for u in report["unavailable"]) + "</ul>")
    return out


def _gates(report: dict[str, Any]) -> list[str]:
    if not report["gates"]:
        return ["<h2>Gates</h2><p>No gates configured.</p>"]
    body = [[_e(g["name"]), _e(g.get("artifact") or "-"), _e(fmt.gate_value(g)),
             _e(f"{fmt.gate_op(g['name'])} {g['threshold']}"),
             f'<span class="{"pass" if g["passed"] else "fail"}">{"pass" if g["passed"] else "FAIL"}</span>',
             _e(g.get("detail"))] for g in report["gates"]]
    return ["<h2>Gates</h2>", _table(["gate", "artifact", "value", "threshold", "result", "detail"], body,
                                     raw=True, table_id="gates")]


def _stages(report: dict[str, Any]) -> list[str]:
    body = []
    for st in report["stages"]:
        note = {"skipped": f"skipped: {st.get('skip_reason') or 'no reason given'}",
                "failed": f"failed: {st.get('error') or ''}", "pending": "did not run"}.get(st["status"], "")
        cls = "skipped" if st["status"] in ("skipped", "pending") else ("fail" if st["status"] == "failed" else "")
        dur = "n/a" if st.get("duration_s") is None else f"{st['duration_s']:.2f} s"
        body.append([_e(st["id"]), _e(st["kind"]), f'<span class="{cls}">{_e(st["status"])}</span>', dur,
                     f'<span class="{cls}">{_e(note)}</span>'])
    return ["<h2>Stages</h2>", _table(["stage", "kind", "status", "duration", "note"], body, raw=True,
                                      table_id="stages")]


def _profile(st: dict[str, Any]) -> list[str]:
    m = st["metrics"]
    out = [f"<h2>Profile ({_e(st['id'])})</h2>"]
    if m.get("totals"):
        out.append(_kv(m["totals"]))
    cols = ["name", "type", "output_shape", "channels", "volume", "bytes", "params", "macs", "receptive_field", "stride"]
    out.append("<h3>Per-layer feature maps</h3>" + _dict_table(m.get("layers"), cols, "layers"))
    mem = m.get("memory") or {}
    if mem:
        out.append("<h3>Memory</h3>" + _kv({k: v for k, v in mem.items() if not isinstance(v, (list, dict))}))
    img = plots.memory_timeline(m.get("timeline"), mem.get("peak_at"))
    if img:
        out.append(_img(img, "memory timeline"))
    red = m.get("redundancy") or {}
    if red:
        out.append("<h3>Redundancy</h3>")
        img = plots.redundancy(red)
        if img:
            out.append(_img(img, "redundancy per layer"))
        out.append(_dict_table([dict(layer=k, **{a: b for a, b in v.items() if not isinstance(b, (list, dict))})
                                for k, v in red.items() if isinstance(v, dict)], None, "redundancy"))
    return out


def _prune(st: dict[str, Any]) -> list[str]:
    m = st["metrics"]
    out = [f"<h2>Pruning ({_e(st['id'])})</h2>"]
    before, after = m.get("before") or {}, m.get("after") or {}
    keys = list(dict.fromkeys([*before, *after]))
    if keys:
        out.append(_table(["", *keys], [["before", *(fmt.num(before.get(k)) for k in keys)],
                                        ["after", *(fmt.num(after.get(k)) for k in keys)]]))
    if m.get("accuracy"):
        out.append(_kv({k: fmt.pct(v) if isinstance(v, float) else v for k, v in m["accuracy"].items()}))
    img = plots.pruning(m.get("layers"))
    if img:
        out.append(_img(img, "channels per layer"))
    out.append("<h3>Per layer</h3>" + _dict_table(m.get("layers"), None, "prune-layers"))
    if m.get("left_alone"):
        out.append(f"<p>Left alone: {_e(', '.join(_named(x) for x in m['left_alone']))}</p>")
    return out


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


def _quantize(st: dict[str, Any]) -> list[str]:
    m = st["metrics"]
    out = [f"<h2>Quantization ({_e(st['id'])})</h2>"]
    tgt = m.get("target") or {}
    if tgt:
        sat = tgt.get("saturation") or {}
        out.append(_kv({"target": f"{tgt.get('resolved')} (asked: {tgt.get('requested')})",
                        "this machine": f"{(tgt.get('host') or {}).get('target')}, {(tgt.get('host') or {}).get('model')}",
                        "accuracy measured on target kernels": "yes" if tgt.get("measured_on_target") else
                        "no: not measured here",
                        "exact on": ", ".join(tgt.get("safe_on") or []),
                        "layers that can saturate int16 without VNNI": ", ".join(sat.get("layers_at_risk") or [])
                        or "none",
                        "overflow fix: widened weight scales": ", ".join(
                            f"{k} ({v.get('channels')}/{v.get('of')} channels, up to {v.get('max_factor')}x)"
                            for k, v in (tgt.get("widened_channels") or {}).items()) or "none",
                        "overflow fix: 7-bit weights": ", ".join(tgt.get("seven_bit_weights") or []) or "none"}))
    fb = m.get("fallback") or {}
    if fb:
        out.append(_kv({"fallback steps": len(fb.get("steps") or []),
                        "layers kept float": ", ".join(map(str, fb.get("float_layers") or [])) or "none"}))
        steps = [{"step": s.get("step"), "float layers": ", ".join(s.get("float_layers") or []) or "none",
                  "accuracy": fmt.pct(s.get("accuracy")), "agreement": fmt.pct(s.get("agreement")),
                  "kept": "yes" if s.get("accepted", True) else "undone"} for s in fb.get("steps") or []]
        out.append("<h3>Fallback steps</h3>" + _dict_table(steps, None, "fallback-steps"))
    img = plots.layer_errors(m.get("layer_errors"))
    if img:
        out.append(_img(img, "quantization error per layer"))
    out.append("<h3>Per-layer error</h3>" + _dict_table(_with_module(m.get("layer_errors")), None, "quant-errors"))
    return out


def _generic(st: dict[str, Any], title: str) -> list[str]:
    return [f"<h2>{title} ({_e(st['id'])})</h2>",
            f"<details><summary>metrics</summary><pre>{_e(json.dumps(st['metrics'], indent=1, default=str)[:20000])}"
            "</pre></details>"]


def _plot_artifacts(report: dict[str, Any], run_dir: Path | None) -> list[str]:
    """PNG plot artifacts that stages wrote into the run directory, inlined."""
    out = []
    for st in report["stages"]:
        for name, a in (st.get("artifacts") or {}).items():
            if not isinstance(a, dict) or a.get("kind") != "plot" or run_dir is None:
                continue
            if name in DRAWN_INLINE.get(st["kind"], ()):  # already drawn in the stage's own section
                continue
            path = Path(run_dir) / str(a.get("path"))
            if path.suffix.lower() == ".png" and path.is_file():
                out.append(f"<h3>{_e(st['id'])}: {_e(name)}</h3><p>{_e(a.get('description'))}</p>"
                           + _img(base64.b64encode(path.read_bytes()).decode("ascii"), name))
            else:
                out.append(f"<p class=\"skipped\">plot {_e(name)} not found at {_e(a.get('path'))}</p>")
    return ["<h2>Plots from the run</h2>", *out] if out else []


def _dict_table(rows: Any, cols: list[str] | None, table_id: str, limit: int = 1000) -> str:
    if not isinstance(rows, list) or not rows:
        return "<p>none</p>"
    rows = [r for r in rows if isinstance(r, dict)]
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))
    body = [[_e(_cell(r.get(c))) for c in cols] for r in rows[:limit]]
    more = f"<p>{len(rows) - limit} more rows in report.json</p>" if len(rows) > limit else ""
    return f'<div class="scroll">{_table(cols, body, raw=True, table_id=table_id)}</div>{more}'


def _cell(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "×".join(map(str, v)) if all(isinstance(x, int) for x in v) else json.dumps(v, default=str)
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    return fmt.num(v)


def _kv(d: dict[str, Any]) -> str:
    return _table(["key", "value"], [[_e(k), _e(_cell(v))] for k, v in d.items()], raw=True)


def _table(head: list[str], body: list[list[Any]], raw: bool = False, table_id: str | None = None) -> str:
    hid = f' id="{table_id}"' if table_id else ""
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table{hid}><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _img(b64: str, alt: str) -> str:
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{b64}"></p>'


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))
