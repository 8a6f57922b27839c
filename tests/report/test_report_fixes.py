"""HTML/Markdown report details users tripped over: a pass banner without gates, plots drawn
twice, raw Python dicts, numbers wrapping inside table cells."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from pipeline.report import plots, write_reports
from tests.report.test_report import synthetic_manifest


def _write(run_dir: Path, manifest: dict) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def test_no_gates_is_its_own_state_not_a_pass(tmp_path):
    d = tmp_path / "run"
    m = synthetic_manifest(d)
    m["status"], m["exit_code"] = "ok", 0
    for st in m["stages"]:
        st["gates"] = []
    _write(d, m)
    out = write_reports(d, ("html", "md"))
    html, md = out["html"].read_text(), out["md"].read_text()
    assert 'class="banner none"' in html and "No gates configured" in html
    assert "gates passed" not in html.lower() and "✅" not in md.splitlines()[0]
    assert "no gates configured" in md.splitlines()[0]


def test_passing_gates_still_get_the_pass_banner(tmp_path):
    d = tmp_path / "run"
    m = synthetic_manifest(d)
    m["status"], m["exit_code"] = "ok", 0
    m["stages"][-1]["gates"] = [g for g in m["stages"][-1]["gates"] if g["passed"]]
    _write(d, m)
    html = write_reports(d, ("html",))["html"].read_text()
    assert 'class="banner pass"' in html and "All 1 gates passed" in html


def test_stage_plots_are_not_drawn_twice_and_left_alone_is_prose(tmp_path):
    d = tmp_path / "run"
    m = synthetic_manifest(d)
    png = base64.b64decode(plots.memory_timeline([["a", 1], ["b", 2]]))
    (d / "profile").mkdir(parents=True)
    (d / "profile" / "memory_timeline.png").write_bytes(png)
    m["stages"][0]["artifacts"]["plot_memory_timeline"] = {"path": "profile/memory_timeline.png", "kind": "plot",
                                                            "description": "live bytes"}
    m["stages"][1]["metrics"]["left_alone"] = [{"name": "fc", "reason": "classifier output"}]
    _write(d, m)
    html = write_reports(d, ("html",))["html"].read_text()
    assert base64.b64encode(png).decode() not in html  # the section draws the timeline from report.json
    assert html.count('alt="memory timeline"') == 1
    assert "Left alone: fc (classifier output)" in html and "{&#x27;name&#x27;" not in html


def test_latency_cells_do_not_wrap():
    from pipeline.report.html import CSS

    assert "#summary td" in CSS and "white-space:nowrap" in CSS


@pytest.mark.slow  # ~30 s on a shared 2-core machine (loads and runs the builtin model)
def test_readme_visualize_command_runs_as_written(tmp_path):
    """The README's `fmap visualize builtin:digits_cnn --images builtin:digits` (plus --out here)."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    line = next(ln for ln in (root / "README.md").read_text().splitlines() if ln.startswith("fmap visualize"))
    args = line.split("#")[0].split()[1:]
    assert args == ["visualize", "builtin:digits_cnn", "--images", "builtin:digits"]
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--out", str(tmp_path / "viz"),
                          "--max-images", "4", "--no-gradcam"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    assert re.search(r"^4 images, layers ", out.stderr, re.M) and (tmp_path / "viz" / "qa.html").is_file()


def test_readme_summary_block_comes_from_a_run(tmp_path):
    from pipeline.report.readme import END, START, update_readme

    d = tmp_path / "run"
    _write(d, synthetic_manifest(d))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nstale 99.63%\n{END}\nrest\n")
    update_readme(d, readme)
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| **onnx_int8** | onnxruntime | 88.00% |" in text and "2 threads" in text


def test_quantization_errors_name_module_paths(tmp_path):
    d = tmp_path / "run"
    m = synthetic_manifest(d)
    m["stages"][2] = {"id": "quantize", "kind": "quantize", "status": "ok", "duration_s": 1.0, "artifacts": {},
                      "gates": [], "metrics": {"layer_errors": [
                          {"tensor": "onnx::Conv_64", "kind": "weight", "sqnr_db": 20.0,
                           "layer": "/layer1/layer1.0/conv1/Conv"}]}}
    _write(d, m)
    html = write_reports(d, ("html",))["html"].read_text()
    table = html.split('id="quant-errors"')[1].split("</table>")[0]
    assert "<th>module</th>" in table and "<td>layer1.0.conv1</td>" in table
