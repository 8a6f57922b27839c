"""report.json: the manifest plus a flat, stable summary that the other formats render.

All report formats are built from this one dict, so they cannot disagree. It tolerates any stage
being absent, skipped or failed: missing numbers are null, never invented.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.atomic import dumps_json
from pipeline.report import report_format

SCHEMA_VERSION = "1.0"


def build_report(manifest: dict[str, Any]) -> dict[str, Any]:
    """The report dict (validated by report.schema.json) from a run's manifest.json."""
    stages = [_stage(s) for s in manifest.get("stages") or []]
    gates = [dict(g, stage=s["id"]) for s in stages for g in s["gates"]]
    rows: list[dict[str, Any]] = []
    unavailable: list[dict[str, Any]] = []
    for s in stages:
        if s["kind"] == "verify" and s["status"] in ("ok", "resumed"):
            rows += _rows(s, [g for g in gates if g["stage"] == s["id"]])
            unavailable += [dict(u, stage=s["id"]) for u in s["metrics"].get("unavailable") or []]
    failed = [g for g in gates if not g.get("passed")]
    machine = _machine(stages)
    return {
        "schema_version": SCHEMA_VERSION,
        "fmap_version": manifest.get("fmap_version"),
        "recipe_name": manifest.get("recipe_name"),
        "run_dir": manifest.get("run_dir"),
        "status": manifest.get("status", "unknown"),
        "exit_code": manifest.get("exit_code"),
        "started": manifest.get("started"),
        "finished": manifest.get("finished"),
        "environment": manifest.get("environment") or {},
        "summary": {
            "stages": len(stages),
            "stages_skipped": sum(s["status"] == "skipped" for s in stages),
            "stages_failed": sum(s["status"] == "failed" for s in stages),
            "gates_total": len(gates), "gates_failed": len(failed),
            "passed": not failed and manifest.get("status", "ok") == "ok",
            "busy_machine": bool(machine.get("busy")),
        },
        "machine": machine,
        "artifacts": rows,
        "gates": gates,
        "unavailable": unavailable,
        "stages": stages,
    }


def _stage(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(s.get("id") or s.get("kind") or "?"),
        "kind": str(s.get("kind") or s.get("id") or "?"),
        "status": s.get("status") or "pending",
        "skip_reason": s.get("skip_reason"),
        "error": s.get("error"),
        "started": s.get("started"),
        "duration_s": s.get("duration_s"),
        "config": s.get("config") or {},
        "metrics": s.get("metrics") or {},
        "artifacts": s.get("artifacts") or {},
        "gates": list(s.get("gates") or []),
    }


def _rows(stage: dict[str, Any], gates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per artifact x backend measured by a verify stage."""
    m = stage["metrics"]
    bs = str(m.get("gate_batch_size") or (m.get("latency_config") or {}).get("batch_sizes", [1])[0])
    out = []
    for r in m.get("results") or []:
        where = f"{r.get('artifact')}@{r.get('backend')}"
        mine = [g for g in gates if g.get("artifact") in (where, r.get("artifact"))]
        acc = r.get("accuracy") or {}
        lat = (r.get("latency") or {}).get(bs) or {}
        spd = (r.get("speedup") or {}).get(bs) or {}
        fp32 = (r.get("speedup_fp32") or {}).get(bs) or {}
        out.append({
            "stage": stage["id"], "artifact": r.get("artifact"), "backend": r.get("backend"),
            "kind": r.get("kind"), "precision": r.get("precision"), "path": r.get("path"),
            "baseline": bool(r.get("baseline")), "deployable": r.get("artifact") == m.get("deployable"),
            "size_bytes": r.get("size_bytes"),
            "top1": acc.get("top1"), "top5": acc.get("top5"), "agreement": acc.get("agreement"),
            "agreement_confident": acc.get("agreement_confident"), "sqnr_db": acc.get("sqnr_db"),
            "max_abs_err": acc.get("max_abs_err"), "mean_abs_err": acc.get("mean_abs_err"),
            "batch_size": int(bs), "p50_ms": lat.get("p50_ms"), "p50_ci95_ms": lat.get("ci95_ms"),
            "p99_ms": lat.get("p99_ms"), "throughput_ips": lat.get("throughput_ips"),
            "speedup": spd.get("ratio"), "speedup_ci95": spd.get("ci95"),
            "speedup_fp32": fp32.get("ratio"), "speedup_fp32_ci95": fp32.get("ci95"), "speedup_fp32_vs": fp32.get("vs"),
            "load_avg_1m": lat.get("load_avg_1m"), "busy": lat.get("busy"),
            "rss_delta_mb": (r.get("memory") or {}).get("rss_delta_mb"),
            "gate_status": "none" if not mine else ("fail" if any(not g.get("passed") for g in mine) else "pass"),
            "error": acc.get("error") or lat.get("error"),
        })
    return out


def _machine(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """CPU model/flags and load around the timing of the last verify stage (empty without one)."""
    verify = [s for s in stages if s["kind"] == "verify" and s["status"] in ("ok", "resumed")]
    return dict(verify[-1]["metrics"].get("machine") or {}) if verify else {}


@report_format("json", "report.json")
def render_json(report: dict[str, Any], run_dir: Path | None = None) -> str:
    return dumps_json(report)
