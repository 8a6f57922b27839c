"""`fmap compare`: latency judged by within-run ratios, unchanged artifacts never flagged,
`--format md`, and the docs/ci.md step failing the job when compare fails."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.commands.report import Regression, compare
from pipeline.report.compare import compare_runs

ROOT = Path(__file__).resolve().parents[1]


def _row(artifact, backend, p50, speed, ci=0.05, top1=0.9, baseline=False):
    return {"artifact": artifact, "backend": backend, "kind": "onnx", "precision": "int8", "path": None,
            "size_bytes": 1000, "baseline": baseline, "memory": {"rss_delta_mb": 1.0},
            "accuracy": {"top1": top1, "agreement": 1.0},
            "latency": {"1": {"p50_ms": p50, "ci95_ms": [p50 * (1 - ci), p50 * (1 + ci)]}},
            "speedup": {"1": {"ratio": speed, "ci95": [speed * (1 - ci), speed * (1 + ci)]}}}


def manifest(orig_p50: float, int8_p50: float, top1: float = 0.9, sha: str = "a" * 64) -> dict:
    return {"status": "ok", "run_dir": "r", "stages": [
        {"id": "quantize", "kind": "quantize", "status": "ok", "metrics": {},
         "artifacts": {"onnx_int8": {"path": "quantize/model_int8.onnx", "kind": "onnx", "sha256": sha}}},
        {"id": "verify", "kind": "verify", "status": "ok", "gates": [], "metrics": {
            "deployable": "onnx_int8", "gate_batch_size": 1,
            "results": [_row("original", "torch", orig_p50, 1.0, baseline=True),
                        _row("onnx_int8", "onnxruntime", int8_p50, orig_p50 / int8_p50, top1=top1)]}}]}


def test_unchanged_original_under_load_is_not_a_regression():
    """The issue's case: original@torch +327.8% absolute because run B's machine was busier."""
    quiet, busy = manifest(110.0, 30.0), manifest(470.0, 128.0, sha="b" * 64)
    res = compare_runs(quiet, busy)
    assert not res["regressed"], res["regressions"]
    rows = {d["artifact"]: d for d in res["artifacts"]}
    assert rows["original"]["latency_basis"] == "baseline" and rows["original"]["latency_change"] == 0.0
    assert rows["onnx_int8"]["latency_basis"] == "within_run_ratio"
    assert abs(rows["onnx_int8"]["latency_change"]) < 0.02  # 3.67x vs 3.67x


def test_slower_relative_to_its_own_original_is_a_regression():
    res = compare_runs(manifest(100.0, 25.0), manifest(100.0, 50.0, sha="b" * 64))
    assert res["regressed"] and "latency +100.0% relative to its run's original" in res["regressions"][0]


def test_artifact_with_the_same_sha256_is_never_flagged():
    res = compare_runs(manifest(100.0, 25.0), manifest(100.0, 50.0, top1=0.5))  # same sha, noisy numbers
    d = next(d for d in res["artifacts"] if d["artifact"] == "onnx_int8")
    assert d["unchanged"] and d["regressions"] == [] and not res["regressed"]


def test_same_runtime_fp32_ratio_is_preferred_when_both_runs_have_it():
    """Under load torch's ratio swings (original 5x -> 18x); the FP32 ratio of one runtime does not."""
    a, b = manifest(100.0, 25.0), manifest(400.0, 100.0 * 4 / 18, sha="b" * 64)  # vs original: 4x -> 18x
    for m, fp32 in ((a, 1.55), (b, 1.45)):
        m["stages"][1]["metrics"]["results"][1]["speedup_fp32"] = {
            "1": {"ratio": fp32, "ci95": [fp32 * 0.95, fp32 * 1.05], "vs": "onnx_fp32@onnxruntime"}}
    res = compare_runs(b, a)  # busy run as the reference: vs original, A would look 4.5x slower
    d = next(d for d in res["artifacts"] if d["artifact"] == "onnx_int8")
    assert d["latency_basis"] == "within_run_fp32_ratio" and not res["regressed"]
    assert abs(d["latency_change"] - (1.45 / 1.55 - 1)) < 1e-9


def test_absolute_p50_only_when_a_run_has_no_ratio():
    a, b = manifest(100.0, 25.0), manifest(100.0, 50.0, sha="b" * 64)
    for m in (a, b):
        m["stages"][1]["metrics"]["results"][1]["speedup"] = {}
    d = next(d for d in compare_runs(a, b)["artifacts"] if d["artifact"] == "onnx_int8")
    assert d["latency_basis"] == "absolute_p50" and d["regressions"]


def _write(tmp_path: Path, name: str, m: dict) -> Path:
    d = tmp_path / name
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_format_md_is_a_pr_comment(tmp_path):
    a = _write(tmp_path, "a", manifest(100.0, 25.0))
    b = _write(tmp_path, "b", manifest(100.0, 50.0, sha="b" * 64))
    res = CliRunner().invoke(compare, [str(a), str(b), "--format", "md"])
    assert isinstance(res.exception, Regression) and res.exception.exit_code == 1
    assert res.output.startswith("## fmap compare — ❌ 1 regression(s)")
    assert "| onnx_int8 | onnxruntime |" in res.output and "4.00x" in res.output and "2.00x" in res.output
    same = _write(tmp_path, "c", manifest(100.0, 25.0))
    res = CliRunner().invoke(compare, [str(a), str(same), "--format", "md"])
    assert res.exit_code == 0 and "✅ no regression" in res.output and "unchanged (same sha256)" in res.output


def _ci_compare_step() -> dict:
    text = (ROOT / "docs" / "ci.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    steps = yaml.safe_load(block)["jobs"]["compress"]["steps"]
    return next(s for s in steps if s.get("id") == "compare")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_compare_step_fails_the_job_when_compare_fails(tmp_path):
    step = _ci_compare_step()
    assert step["shell"] == "bash"
    runs = tmp_path / "runs"
    _write(runs, "baseline", manifest(100.0, 25.0))
    _write(runs, "pr", {"status": "failed", "stages": []})  # the PR's run crashed
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fmap = bin_dir / "fmap"  # the real CLI, as `pip install` would put it on PATH
    fmap.write_text(f"#!/bin/sh\nexec {sys.executable} -m pipeline.cli \"$@\"\n")
    fmap.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    # GitHub runs `shell: bash` as: bash --noprofile --norc -eo pipefail {0}
    script = tmp_path / "step.sh"
    script.write_text(step["run"] + "\n")
    gh = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
    assert gh.returncode == 2, gh.stderr
    assert "did not finish (status 'failed')" in gh.stderr
    # the default `sh -e` would have hidden it behind tee: the reason for `shell: bash`
    plain = subprocess.run(["sh", "-e", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert plain.returncode == 0


def test_compare_md_of_a_copy_is_clean(tmp_path):
    m = manifest(100.0, 25.0)
    a = _write(tmp_path, "a", m)
    b = _write(tmp_path, "b", copy.deepcopy(m))
    res = CliRunner().invoke(compare, [str(a), str(b), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["regressed"] is False


def test_n_runs_each_judged_against_the_first(tmp_path):
    """3 runs: B (same file) and C (2x slower vs its own original, bigger) against A; exit 1 names C only."""
    from pipeline.report import fmt

    a = _write(tmp_path, "a", manifest(100.0, 25.0))
    b = _write(tmp_path, "b", manifest(100.0, 25.0))
    slow = manifest(100.0, 50.0, sha="c" * 64)
    slow["stages"][1]["metrics"]["results"][1]["size_bytes"] = 2000
    c = _write(tmp_path, "c", slow)
    res = CliRunner().invoke(compare, [str(a), str(b), str(c), "--json"])
    assert res.exit_code == 1
    data = json.loads(res.output[:res.output.rindex("}") + 1])
    assert data["reference"] == str(a) and data["runs"] == [str(a), str(b), str(c)]
    assert [cmp["run"] for cmp in data["comparisons"]] == [str(b), str(c)]
    assert not data["comparisons"][0]["regressed"] and data["comparisons"][1]["regressed"]
    assert all(r.startswith(f"{c}: onnx_int8@onnxruntime") for r in data["regressions"]) and len(data["regressions"]) == 2
    int8 = next(r for r in data["rows"] if r["artifact"] == "onnx_int8")
    assert int8["regressed"] == [False, False, True]
    assert [cell["speedup"] for cell in int8["cells"]] == [4.0, 4.0, 2.0]
    md = CliRunner().invoke(compare, [str(a), str(b), str(c), "--format", "md"])
    assert md.exit_code == 1 and "## fmap compare — 3 runs — ❌ 2 regression(s)" in md.output
    assert "| onnx_int8 | onnxruntime | 90.00% · 4.00x" in md.output and f"2.00x · {fmt.size(2000)} ❌ |" in md.output
    text = CliRunner().invoke(compare, [str(a), str(b), str(c)])
    assert text.exit_code == 1 and "REGRESSED" in text.output
    # a reference that regresses nothing: exit 0
    assert CliRunner().invoke(compare, [str(a), str(b), str(a)]).exit_code == 0


def test_compare_needs_two_runs(tmp_path):
    a = _write(tmp_path, "a", manifest(100.0, 25.0))
    res = CliRunner().invoke(compare, [str(a)], standalone_mode=False)
    assert res.exception.exit_code == 2 and "at least two run directories" in str(res.exception)
