"""Compare two runs (A = reference, B = candidate): what changed, and whether B regresses A.

Regressions judged per artifact@backend present in both runs:
- accuracy: top-1 (agreement when unlabelled) dropped by more than `max_accuracy_drop` (absolute);
- latency: judged by *within-run ratios*: each run's speedup of the artifact over its own
  reference timed interleaved in the same process: the same runtime's FP32 artifact when both
  runs have it (steadiest under load), else the original in torch. Two runs on a machine
  under different load differ in absolute times, but the load hits both sides of a within-run
  ratio alike. A regression is a slowdown relative to the run's own baseline of more than
  `max_latency_increase` AND non-overlapping 95% intervals of the two ratios. Absolute p50s are
  used only when a run has no within-run ratio, and are labelled so;
- size: artifact size grew by more than `max_size_increase` (relative).
An artifact whose file has the same sha256 in both runs did not change and is never flagged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import BadInput
from pipeline.report.document import build_report

FINISHED = ("ok", "gate_failed")  # a run that got through verify, whatever its gates said


def require_finished(manifest: dict[str, Any], run_dir: str | Path) -> None:
    """Refuse (exit 2) a run that did not finish: comparing against nothing must not pass CI."""
    status = manifest.get("status")
    if not manifest:
        raise BadInput(f"run {run_dir} has an empty manifest.json: it did not finish, nothing to compare")
    if status not in FINISHED:
        shown = "no status" if status is None else f"status '{status}'"
        why = f": {manifest['error']}" if manifest.get("error") else ""
        raise BadInput(f"run {run_dir} did not finish ({shown}{why}); compare needs a finished run")
    if not manifest.get("stages"):
        raise BadInput(f"run {run_dir} has no stages in its manifest.json; nothing to compare")


def compare_runs(a: dict[str, Any], b: dict[str, Any], max_accuracy_drop: float = 0.01,
                 max_latency_increase: float = 0.10, max_size_increase: float = 0.05) -> dict[str, Any]:
    """a, b: manifests. Returns a JSON-serialisable diff with a `regressions` list."""
    ra, rb = build_report(a), build_report(b)
    rows_a = {(r["artifact"], r["backend"]): r for r in ra["artifacts"]}
    rows_b = {(r["artifact"], r["backend"]): r for r in rb["artifacts"]}
    sha_a, sha_b = _artifact_hashes(a), _artifact_hashes(b)
    regressions: list[str] = []
    diffs = []
    for key in [k for k in rows_a if k in rows_b]:
        x, y = rows_a[key], rows_b[key]
        where = f"{key[0]}@{key[1]}"
        unchanged = bool(sha_a.get(key[0]) and sha_a.get(key[0]) == sha_b.get(key[0]))
        metric = "top1" if x["top1"] is not None and y["top1"] is not None else "agreement"
        drop = None if x[metric] is None or y[metric] is None else x[metric] - y[metric]
        lat, significant, basis = _latency_change(x, y)
        size = _rel(x["size_bytes"], y["size_bytes"])
        d = {"artifact": key[0], "backend": key[1], "unchanged": unchanged, "accuracy_metric": metric,
             "accuracy_a": x[metric], "accuracy_b": y[metric], "accuracy_drop": drop, "batch_size": y["batch_size"],
             "p50_ms_a": x["p50_ms"], "p50_ci95_a": x["p50_ci95_ms"], "p50_ms_b": y["p50_ms"],
             "p50_ci95_b": y["p50_ci95_ms"], "speedup_a": x["speedup"], "speedup_ci95_a": x["speedup_ci95"],
             "speedup_b": y["speedup"], "speedup_ci95_b": y["speedup_ci95"], "latency_basis": basis,
             "latency_change": lat, "latency_change_significant": significant,
             "busy_a": bool(x.get("busy")), "busy_b": bool(y.get("busy")),
             "size_bytes_a": x["size_bytes"], "size_bytes_b": y["size_bytes"], "size_change": size,
             "rss_delta_mb_a": x["rss_delta_mb"], "rss_delta_mb_b": y["rss_delta_mb"], "regressions": []}
        if not unchanged:  # the same file cannot have regressed: differences are noise or load
            if drop is not None and drop > max_accuracy_drop:
                d["regressions"].append(f"{where}: {metric} dropped {drop:.4f} (> {max_accuracy_drop})")
            if lat is not None and lat > max_latency_increase and significant:
                what = {"within_run_ratio": "relative to its run's original",
                        "within_run_fp32_ratio": f"relative to its run's {x.get('speedup_fp32_vs')}"}.get(
                            basis, "absolute p50")
                d["regressions"].append(f"{where}: latency +{100 * lat:.1f}% {what} "
                                        f"(> {100 * max_latency_increase:.1f}%, intervals do not overlap)")
            if size is not None and size > max_size_increase:
                d["regressions"].append(f"{where}: size +{100 * size:.1f}% (> {100 * max_size_increase:.1f}%)")
        regressions += d["regressions"]
        diffs.append(d)
    return {
        "run_a": ra.get("run_dir"), "run_b": rb.get("run_dir"),
        "tolerances": {"max_accuracy_drop": max_accuracy_drop, "max_latency_increase": max_latency_increase,
                       "max_size_increase": max_size_increase},
        "artifacts": diffs,
        "only_in_a": [f"{k[0]}@{k[1]}" for k in rows_a if k not in rows_b],
        "only_in_b": [f"{k[0]}@{k[1]}" for k in rows_b if k not in rows_a],
        "peak_memory_bytes": {"a": _peak(ra), "b": _peak(rb)},
        "channels": _channels(ra, rb),
        "gates": {"a_failed": ra["summary"]["gates_failed"], "b_failed": rb["summary"]["gates_failed"]},
        "busy": {"a": bool(ra["summary"].get("busy_machine")), "b": bool(rb["summary"].get("busy_machine"))},
        "regressions": regressions,
        "regressed": bool(regressions),
    }


def _latency_change(x: dict[str, Any], y: dict[str, Any]) -> tuple[float | None, bool, str]:
    """(relative slowdown B vs A, significant?, basis). Within-run ratios when both runs have them."""
    # The same runtime's FP32 artifact is the steadier reference: both sides of the ratio share a
    # runtime and its threading, so load hits them alike (benchmarks/RESULTS.md, busy machine).
    for field, basis in (("speedup_fp32", "within_run_fp32_ratio"), ("speedup", "within_run_ratio")):
        sa, sb = x.get(field), y.get(field)
        if field == "speedup_fp32" and x.get("speedup_fp32_vs") != y.get("speedup_fp32_vs"):
            continue
        if sa and sb and not x.get("baseline"):
            change = sa / sb - 1.0  # B needs this much more time than A, each relative to its own reference
            ca, cb = x.get(f"{field}_ci95"), y.get(f"{field}_ci95")
            significant = bool(ca and cb and cb[1] < ca[0])
            return change, significant, basis
    if x.get("baseline") and y.get("baseline"):
        return 0.0, False, "baseline"  # each run's reference: 1.0 by definition
    lat = _rel(x["p50_ms"], y["p50_ms"])
    significant = bool(x["p50_ci95_ms"] and y["p50_ci95_ms"] and y["p50_ci95_ms"][0] > x["p50_ci95_ms"][1])
    return lat, significant, "absolute_p50"


def _artifact_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """{artifact name: sha256} over every stage's recorded artifacts."""
    out: dict[str, str] = {}
    for st in manifest.get("stages") or []:
        for name, art in (st.get("artifacts") or {}).items():
            if isinstance(art, dict) and art.get("sha256"):
                out[name] = art["sha256"]
    return out


def _rel(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or a == 0 else b / a - 1.0


def _stage(report: dict[str, Any], kind: str) -> dict[str, Any]:
    st = next((s for s in reversed(report["stages"]) if s["kind"] == kind and s["status"] in ("ok", "resumed")), None)
    return st["metrics"] if st else {}


def _peak(report: dict[str, Any]) -> int | None:
    """Activation liveness peak of the final model: prune's `after` if pruned, else profile's."""
    after = (_stage(report, "prune").get("after") or {}).get("liveness_peak_bytes")
    return after if after is not None else (_stage(report, "profile").get("memory") or {}).get("liveness_peak_bytes")


def _layer_channels(report: dict[str, Any]) -> dict[str, int]:
    prune = _stage(report, "prune").get("layers") or []
    if prune:
        return {str(r.get("name")): r.get("channels_after") for r in prune if isinstance(r, dict)}
    return {str(r.get("name")): r.get("channels") for r in _stage(report, "profile").get("layers") or []
            if isinstance(r, dict) and r.get("channels") is not None}


def _channels(ra: dict[str, Any], rb: dict[str, Any]) -> list[dict[str, Any]]:
    ca, cb = _layer_channels(ra), _layer_channels(rb)
    return [{"layer": n, "a": ca.get(n), "b": cb.get(n)} for n in dict.fromkeys([*ca, *cb]) if ca.get(n) != cb.get(n)]


def render_compare_markdown(result: dict[str, Any]) -> str:
    """The comparison as a pull-request comment: verdict, one table, regressions listed."""
    from pipeline.report import fmt

    verdict = (f"❌ {len(result['regressions'])} regression(s)" if result["regressed"] else "✅ no regression")
    lines = [f"## fmap compare — {verdict}", "",
             f"`{result['run_a']}` (A, reference) → `{result['run_b']}` (B, candidate). Latency is judged by each "
             "run's speedup over its own reference (the same runtime's FP32 artifact where both runs have one, "
             "marked 'vs FP32', else the original), so load differences between runs cancel.", ""]
    busy = [side.upper() for side in ("a", "b") if (result.get("busy") or {}).get(side)]
    if busy:
        lines += [f"> ⚠️ run {' and '.join(busy)} measured latency on a busy machine.", ""]
    lines += ["| artifact | backend | accuracy A → B | speedup A → B [95% CI] | latency change | size A → B | |",
              "|---|---|---|---|---|---|---|"]
    for d in result["artifacts"]:
        lat = "n/a" if d["latency_change"] is None else f"{100 * d['latency_change']:+.1f}%" + (
            "" if d["latency_change_significant"] else " (n.s.)")
        lat += {"absolute_p50": " (absolute p50)", "within_run_fp32_ratio": " (vs FP32)"}.get(d["latency_basis"], "")
        state = "unchanged (same sha256)" if d["unchanged"] else ("❌ REGRESSED" if d["regressions"] else "✅")
        lines.append(f"| {d['artifact']} | {d['backend']} | {fmt.pct(d['accuracy_a'])} → {fmt.pct(d['accuracy_b'])} | "
                     f"{fmt.ratio_ci(d['speedup_a'], d['speedup_ci95_a'])} → "
                     f"{fmt.ratio_ci(d['speedup_b'], d['speedup_ci95_b'])} | {lat} | "
                     f"{fmt.size(d['size_bytes_a'])} → {fmt.size(d['size_bytes_b'])} | {state} |")
    lines.append("")
    for side in ("only_in_a", "only_in_b"):
        if result[side]:
            lines.append(f"- {side.replace('_', ' ')}: {', '.join(result[side])}")
    for c in result["channels"]:
        lines.append(f"- channels `{c['layer']}`: {c['a']} → {c['b']}")
    for r in result["regressions"]:
        lines.append(f"- ❌ {r}")
    return "\n".join(lines) + "\n"
