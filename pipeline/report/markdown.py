"""report.md: sized for a pull-request comment. Summary table first, details folded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.report import fmt, report_format


@report_format("md", "report.md")
def render_markdown(report: dict[str, Any], run_dir: Path | None = None) -> str:
    s = report["summary"]
    state, text = fmt.verdict(report)
    verdict = {"pass": "✅ ", "fail": "❌ ", "none": "➖ "}[state] + text
    lines = [f"## fmap: {report.get('recipe_name') or 'run'} — {verdict}", "",
             f"Status `{report['status']}` · exit code {report.get('exit_code')} · "
             f"fmap {report.get('fmap_version')} · {s['stages']} stages "
             f"({s['stages_skipped']} skipped, {s['stages_failed']} failed)", ""]
    machine = report.get("machine") or {}
    if machine.get("busy"):
        lines += [f"> ⚠️ **busy machine**: {busy_text(machine)}. Latencies and speedups below were measured "
                  "under load and may be biased.", ""]
    lines += _artifact_table(report["artifacts"])
    floor = noise_floor_text(report)
    lines += [floor, ""] if floor else []
    lines += _not_measured(report)
    if report["gates"]:
        lines += ["<details><summary>Gates</summary>", "", "| gate | artifact | value | threshold | result | detail |",
                  "|---|---|---|---|---|---|"]
        for g in report["gates"]:
            lines.append(f"| {g['name']} | {g.get('artifact') or '-'} | {fmt.gate_value(g)} | "
                         f"{fmt.gate_op(g['name'])} {g['threshold']} | {'✅' if g['passed'] else '❌'} | "
                         f"{_cell(g.get('detail'))} |")
        lines += ["", "</details>", ""]
    lines += ["<details><summary>Stages</summary>", "", "| stage | kind | status | duration | key numbers |",
              "|---|---|---|---|---|"]
    for st in report["stages"]:
        dur = "n/a" if st.get("duration_s") is None else f"{st['duration_s']:.1f} s"
        lines.append(f"| {st['id']} | {st['kind']} | {st['status']} | {dur} | {_cell(key_numbers(st))} |")
    lines += ["", "</details>", ""]
    env = report.get("environment") or {}
    if env:
        lines += ["<details><summary>Environment</summary>", "", "```json",
                  json.dumps(env, indent=1, default=str), "```", "", "</details>", ""]
    return "\n".join(lines)


def _artifact_table(rows: list[dict[str, Any]]) -> list[str]:
    """The summary table: one row per artifact x backend, the deployable one in bold."""
    if not rows:
        return ["_No verify measurements in this run._", ""]
    lines = [f"| artifact | backend | top-1 | agreement | p50 latency (batch {rows[0]['batch_size']}) [95% CI] | "
             "speedup vs original [95% CI] | speedup vs same-runtime FP32 [95% CI] | size | gates |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"**{r['artifact']}**" if r["deployable"] else r["artifact"]
        name += " (baseline)" if r["baseline"] else ""
        lat = fmt.ms_ci(r["p50_ms"], r["p50_ci95_ms"]) if not r.get("error") else f"error: {r['error'][:60]}"
        lat += " ⚠️busy" if r.get("busy") else ""
        fp32 = (f"{fmt.ratio_ci(r['speedup_fp32'], r.get('speedup_fp32_ci95'))} vs {r.get('speedup_fp32_vs')}"
                if r.get("speedup_fp32") is not None else "n/a")
        lines.append(f"| {name} | {r['backend']} | {fmt.pct(r['top1'])} | {fmt.pct(r['agreement'])} | {lat} | "
                     f"{fmt.ratio_ci(r['speedup'], r['speedup_ci95'])} | {fp32} | {fmt.size(r['size_bytes'])} | "
                     f"{fmt.STATUS_ICON[r['gate_status']]} |")
    return lines + [""]


def noise_floor_text(report: dict[str, Any]) -> str | None:
    """The original's agreement with itself under one grey level of input noise, when verify measured it."""
    verify = [s for s in report["stages"] if s["kind"] == "verify" and (s.get("metrics") or {}).get("noise_floor")]
    if not verify:
        return None
    f = verify[-1]["metrics"]["noise_floor"]
    return (f"Agreement noise floor: the original itself keeps its top-1 on {fmt.pct(f.get('agreement'))} of "
            f"{f.get('samples')} samples under one grey level of input noise "
            f"({fmt.pct(f.get('agreement_confident'))} of the confident ones); read agreement against that.")


def _not_measured(report: dict[str, Any]) -> list[str]:
    """Pairs that could not run and stages that did not finish, each with its reason."""
    lines = [f"- ⚠️ not measured: `{u.get('artifact') or 'all artifacts'}` on `{u.get('backend') or '-'}`: "
             f"{u.get('reason')}" for u in report["unavailable"]]
    for st in report["stages"]:
        if st["status"] == "skipped":
            lines.append(f"- ⏭️ stage `{st['id']}` skipped: {st.get('skip_reason') or 'no reason given'}")
        elif st["status"] == "failed":
            lines.append(f"- 💥 stage `{st['id']}` failed: {st.get('error') or 'no error recorded'}")
        elif st["status"] == "pending":
            lines.append(f"- ⏸️ stage `{st['id']}` did not run (pending)")
    return lines + [""]


def busy_text(machine: dict[str, Any]) -> str:
    """'load average 7.3 on 2 cores while timing (Intel Xeon ..., avx2 avx512_vnni)'."""
    loads = [x for c in (machine.get("conditions") or {}).values()
             for x in (c.get("load_avg_1m_before"), c.get("load_avg_1m_after")) if x is not None]
    peak = f"{max(loads):.1f}" if loads else "?"
    flags = " ".join(machine.get("cpu_flags") or [])
    return (f"load average up to {peak} on {machine.get('cores')} cores while timing "
            f"({machine.get('cpu_model')}{', ' + flags if flags else ''})")


def key_numbers(st: dict[str, Any]) -> str:
    """A one-line digest of a stage's metrics (full numbers are in report.json/html)."""
    m = st["metrics"]
    if st["status"] == "skipped":
        return f"skipped: {st.get('skip_reason') or ''}"
    if st["kind"] == "profile":
        t = m.get("totals") or {}
        mem = m.get("memory") or {}
        return (f"{len(m.get('layers') or [])} layers, MACs {fmt.num(t.get('macs'))}, params {fmt.num(t.get('params'))}, "
                f"peak activations {fmt.size(mem.get('liveness_peak_bytes'))}")
    if st["kind"] == "prune":
        b, a = m.get("before") or {}, m.get("after") or {}
        acc = m.get("accuracy") or {}
        ag = m.get("agreement") or {}
        steps = [(k, ag.get(k)) for k in ("after_prune", "after_reconstruct", "after_bn", "after_blockwise",
                                          "after_finetune") if ag.get(k) is not None]
        agree = (", agreement " + " → ".join(f"{k.removeprefix('after_')} {fmt.pct(v)}" for k, v in steps)) if steps else ""
        dropped = m.get("dropped_blocks") or []
        blocks = f"{len(dropped)} blocks dropped ({', '.join(dropped)}), " if dropped else ""
        return (f"{blocks}MACs {fmt.num(b.get('macs'))} → {fmt.num(a.get('macs'))}, params {fmt.num(b.get('params'))} → "
                f"{fmt.num(a.get('params'))}, top-1 {fmt.pct(acc.get('before'))} → {fmt.pct(acc.get('after_finetune'))}"
                f"{agree}")
    if st["kind"] == "quantize":
        fb = m.get("fallback") or {}
        tgt = m.get("target") or {}
        risky = (tgt.get("saturation") or {}).get("layers_at_risk") or []
        where = (f"target {tgt.get('resolved')}" + ("" if tgt.get("measured_on_target") else " (not measured here)")
                 + (f", ⚠️ {len(risky)} layers can saturate on CPUs without VNNI" if risky else "")) if tgt else ""
        return ", ".join(x for x in (where, f"{len(fb.get('float_layers') or [])} layers kept float",
                                     f"{len(m.get('layer_errors') or [])} layer errors") if x)
    if st["kind"] == "export" and isinstance(m.get("onnx"), dict):
        o, eq = m["onnx"], m["onnx"].get("equivalence") or {}
        trt = (m.get("tensorrt") or {})
        extra = f", tensorrt {trt.get('status')}" + (f": {trt.get('reason')}" if trt.get("reason") else "") if trt else ""
        return (f"opset {o.get('opset')}, {fmt.size(o.get('size_bytes'))}, max abs diff vs torch "
                f"{fmt.num(eq.get('max_abs_diff'))} on {eq.get('samples')} samples{extra}")
    if st["kind"] == "verify":
        floor = m.get("noise_floor") or {}
        return (f"{len(m.get('results') or [])} measurements, {len(m.get('unavailable') or [])} not measured"
                + (f", agreement noise floor {fmt.pct(floor.get('agreement'))}" if floor else ""))
    return ", ".join(f"{k}: {fmt.num(v)}" for k, v in m.items() if isinstance(v, (int, float, str)))[:200]


def _cell(text: Any) -> str:
    return str(text or "").replace("|", "\\|").replace("\n", " ")
