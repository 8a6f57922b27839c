"""Reports from a synthetic manifest: JSON schema, Markdown, self-contained HTML, JUnit, the
`report`/`compare` commands, and the HTML rendered in headless Chromium when it is installed."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from pipeline.commands.report import Regression, compare, report
from pipeline.errors import BadInput
from pipeline.report import load_manifest, write_reports
from pipeline.report.document import build_report


def _row(artifact, backend, top1, p50, speed, size, baseline=False):
    return {"artifact": artifact, "backend": backend, "kind": "onnx" if "onnx" in artifact else "torch",
            "precision": "int8" if "int8" in artifact else "fp32", "path": None, "size_bytes": size,
            "baseline": baseline, "memory": {"rss_delta_mb": 12.5},
            "accuracy": {"samples": 100, "top1": top1, "top5": 0.99, "agreement": 0.97, "max_abs_err": 0.2,
                         "mean_abs_err": 0.01},
            "latency": {"1": {"batch_size": 1, "p50_ms": p50, "ci95_ms": [p50 * 0.95, p50 * 1.05], "p99_ms": p50 * 2,
                              "throughput_ips": 1000 / p50}},
            "speedup": {"1": {"ratio": speed, "ci95": [speed * 0.9, speed * 1.1]}}}


def synthetic_manifest(run_dir: Path) -> dict:
    return {
        "fmap_version": "0.1.0", "recipe_name": "synthetic", "run_dir": str(run_dir), "started": "2025-01-01T00:00:00",
        "finished": "2025-01-01T00:01:00", "status": "gate_failed", "exit_code": 1,
        "environment": {"python": "3.11", "threads": 2, "libraries": {"torch": "2.14"}},
        "stages": [
            {"id": "profile", "kind": "profile", "status": "ok", "duration_s": 1.0, "config": {}, "metrics": {
                "layers": [{"name": "conv1", "type": "Conv2d", "output_shape": [1, 8, 16, 16], "channels": 8,
                            "volume": 2048, "bytes": 8192, "params": 80, "macs": 18432, "receptive_field": 3,
                            "stride": 1}],
                "totals": {"macs": 18432, "params": 80},
                "memory": {"liveness_peak_bytes": 16384, "measured_peak_bytes": 20000, "peak_at": "conv2"},
                "redundancy": {"conv1": {"channels": 8, "dead": 2, "mean_apoz": 0.4, "high_corr_pairs": [[0, 1]]}},
                "timeline": [["conv1", 8192], ["conv2", 16384], ["fc", 40]]},
             "artifacts": {}, "gates": []},
            {"id": "prune", "kind": "prune", "status": "ok", "duration_s": 2.0, "metrics": {
                "before": {"macs": 18432, "params": 80, "liveness_peak_bytes": 16384},
                "after": {"macs": 9216, "params": 40, "liveness_peak_bytes": 8192},
                "layers": [{"name": "conv1", "channels_before": 8, "channels_after": 4}], "left_alone": ["fc"],
                "accuracy": {"before": 0.9, "after_prune": 0.8, "after_finetune": 0.89}},
             "artifacts": {"pruned": {"path": "prune/pruned.pt", "kind": "torch"}}, "gates": []},
            {"id": "quantize", "kind": "quantize", "status": "skipped", "skip_reason": "backend onnxruntime missing",
             "metrics": {}, "artifacts": {}, "gates": []},
            {"id": "verify", "kind": "verify", "status": "ok", "duration_s": 3.0, "metrics": {
                "deployable": "onnx_int8", "gate_batch_size": 1,
                "results": [_row("original", "torch", 0.90, 10.0, 1.0, 4_000_000, baseline=True),
                            _row("onnx_int8", "onnxruntime", 0.88, 4.0, 2.5, 1_000_000)],
                "unavailable": [{"artifact": None, "backend": "tensorrt", "reason": "no CUDA device"}]},
             "artifacts": {}, "gates": [
                 {"name": "min_speedup", "threshold": 2.0, "value": 2.5, "passed": True,
                  "artifact": "onnx_int8@onnxruntime", "detail": "batch 1"},
                 {"name": "max_accuracy_drop", "threshold": 0.01, "value": 0.02, "passed": False,
                  "artifact": "onnx_int8@onnxruntime", "detail": "top-1 0.88 vs 0.90"}]},
        ],
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run_a"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps(synthetic_manifest(d)))
    return d


def _schema() -> dict:
    return json.loads(resources.files("pipeline.report").joinpath("report.schema.json").read_text())


def test_report_json_validates_against_shipped_schema(run_dir):
    paths = write_reports(run_dir)
    assert set(paths) == {"json", "md", "html", "junit"} and all(p.is_file() for p in paths.values())
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp files left by atomic writes
    rep = json.loads(paths["json"].read_text())
    jsonschema.validate(rep, _schema())
    assert rep["schema_version"] == "1.0" and rep["summary"]["gates_failed"] == 1 and not rep["summary"]["passed"]
    row = next(r for r in rep["artifacts"] if r["artifact"] == "onnx_int8")
    assert row["gate_status"] == "fail" and row["deployable"] and row["speedup"] == 2.5


def test_schema_rejects_a_broken_report(run_dir):
    rep = build_report(load_manifest(run_dir))
    bad = copy.deepcopy(rep)
    bad["artifacts"][0]["p50_ci95_ms"] = [1.0]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in rep.items() if k != "gates"}, _schema())


def test_report_tolerates_empty_and_failed_runs(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"status": "failed", "stages": [
        {"id": "prune", "kind": "prune", "status": "failed", "error": "DepGraph exploded"},
        {"id": "verify", "kind": "verify", "status": "pending"}]}))
    paths = write_reports(d)
    jsonschema.validate(json.loads(paths["json"].read_text()), _schema())
    assert "DepGraph exploded" in paths["md"].read_text() and "DepGraph exploded" in paths["html"].read_text()
    suite = ET.parse(paths["junit"]).getroot()
    assert suite.get("errors") == "1" and suite.find(".//error") is not None


def test_markdown_summary_first_details_folded(run_dir):
    md = write_reports(run_dir, ("md",))["md"].read_text()
    first_table = md.index("| artifact | backend |")
    assert first_table < md.index("<details>")
    assert "❌ 1 of 2 gates failed" in md.splitlines()[0]
    assert "| **onnx_int8** | onnxruntime | 88.00% | 97.00% | 4.000 ms [3.800, 4.200] | 2.50x [2.25, 2.75] |" in md
    assert "stage `quantize` skipped: backend onnxruntime missing" in md
    assert "not measured: `all artifacts` on `tensorrt`: no CUDA device" in md


def test_html_is_self_contained_with_all_sections(run_dir):
    html = write_reports(run_dir, ("html",))["html"].read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html and "<link" not in html
    assert html.count("data:image/png;base64,") >= 4  # latency, memory timeline, redundancy, pruning
    for needle in ('id="summary"', 'id="layers"', 'id="gates"', "skipped: backend onnxruntime missing",
                   "no CUDA device", "Per-layer feature maps", "Pruning (", 'alt="channels per layer"',
                   "1×8×16×16"):
        assert needle in html, needle


def test_html_inlines_plot_artifacts(run_dir):
    from pipeline.report import plots

    import base64

    png = base64.b64decode(plots.memory_timeline([["a", 1], ["b", 2]]))
    (run_dir / "viz").mkdir()
    (run_dir / "viz" / "gallery.png").write_bytes(png)
    m = json.loads((run_dir / "manifest.json").read_text())
    m["stages"][0]["artifacts"]["gallery"] = {"path": "viz/gallery.png", "kind": "plot", "description": "maps"}
    (run_dir / "manifest.json").write_text(json.dumps(m))
    html = write_reports(run_dir, ("html",))["html"].read_text()
    assert base64.b64encode(png).decode() in html


def test_junit_one_testcase_per_gate(run_dir):
    root = ET.parse(write_reports(run_dir, ("junit",))["junit"]).getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == 2 and root.get("tests") == "2" and root.get("failures") == "1"
    failed = [c for c in cases if c.find("failure") is not None]
    assert failed[0].get("name") == "max_accuracy_drop[onnx_int8@onnxruntime]"
    assert "0.02" in failed[0].find("failure").get("message")


def test_report_command_and_bad_run_dir(run_dir, tmp_path):
    res = CliRunner().invoke(report, [str(run_dir), "--format", "md"])
    assert res.exit_code == 0 and res.output.strip().endswith("report.md")
    res = CliRunner().invoke(report, [str(tmp_path / "nope")])
    assert isinstance(res.exception, BadInput) and res.exception.exit_code == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    res = CliRunner().invoke(report, [str(tmp_path / "bad")])
    assert isinstance(res.exception, BadInput) and "not valid JSON" in str(res.exception)


def _run_b(run_dir: Path, tmp_path: Path, top1: float, p50: float, size: int) -> Path:
    m = synthetic_manifest(tmp_path / "run_b")
    row = m["stages"][3]["metrics"]["results"][1]
    row["accuracy"]["top1"], row["size_bytes"] = top1, size
    row["latency"]["1"].update(p50_ms=p50, ci95_ms=[p50 * 0.95, p50 * 1.05])
    speed = 10.0 / p50  # compare judges the within-run ratio against the run's own original
    row["speedup"]["1"].update(ratio=speed, ci95=[speed * 0.9, speed * 1.1])
    m["stages"][1]["metrics"]["layers"][0]["channels_after"] = 6
    d = tmp_path / "run_b"
    d.mkdir(exist_ok=True)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_compare_no_regression_within_tolerance(run_dir, tmp_path):
    b = _run_b(run_dir, tmp_path, top1=0.875, p50=4.1, size=1_010_000)
    res = CliRunner().invoke(compare, [str(run_dir), str(b), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert not out["regressed"] and out["channels"] == [{"layer": "conv1", "a": 4, "b": 6}]
    d = next(x for x in out["artifacts"] if x["artifact"] == "onnx_int8")
    assert abs(d["latency_change"] - 0.025) < 1e-9 and not d["latency_change_significant"]


def test_compare_flags_each_regression(run_dir, tmp_path):
    b = _run_b(run_dir, tmp_path, top1=0.85, p50=6.0, size=1_200_000)
    res = CliRunner().invoke(compare, [str(run_dir), str(b), "--json"])
    assert isinstance(res.exception, Regression) and res.exception.exit_code == 1
    regs = json.loads(res.output)["regressions"]
    assert len(regs) == 3 and any("top1 dropped" in r for r in regs) and any("latency" in r for r in regs)
    res = CliRunner().invoke(compare, [str(run_dir), str(b), "--max-accuracy-drop", "0.1",
                                       "--max-latency-increase", "1", "--max-size-increase", "0.5"])
    assert res.exit_code == 0 and "onnx_int8" in res.output


def test_html_renders_in_headless_chromium(run_dir, tmp_path):
    from pipeline.report import screenshot

    if screenshot.chromium() is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    html = write_reports(run_dir, ("html",))["html"]
    dom, errors = screenshot.dump_dom(html)
    assert errors == [] and 'id="summary"' in dom and "onnx_int8" in dom
    png = screenshot.screenshot(html, tmp_path / "shot.png", height=900)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_junit_marks_timing_gates_measured_on_a_busy_machine():
    from pipeline.report.junit import render_junit

    gates = [{"name": "min_speedup", "threshold": 2.0, "value": 2.4, "passed": True, "artifact": "onnx_int8",
              "stage": "verify", "detail": ""},
             {"name": "min_agreement", "threshold": 0.98, "value": 0.99, "passed": True, "artifact": "onnx_int8",
              "stage": "verify", "detail": ""}]
    report = {"recipe_name": "x", "gates": gates, "stages": [], "summary": {"busy_machine": True},
              "machine": {"cpu_model": "AMD EPYC", "cores": 2, "cpu_flags": ["avx2"]}}
    root = ET.fromstring(render_junit(report).split("\n", 1)[1])
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert props["busy_machine"] == "true" and props["cores"] == "2" and props["cpu_model"] == "AMD EPYC"
    outs = {c.get("name"): c.find("system-out").text for c in root.iter("testcase")}
    assert "busy machine" in outs["min_speedup[onnx_int8]"] and "busy" not in outs["min_agreement[onnx_int8]"]
    quiet = ET.fromstring(render_junit({**report, "summary": {"busy_machine": False}}).split("\n", 1)[1])
    assert all("busy machine" not in (c.find("system-out").text or "") for c in quiet.iter("testcase"))
