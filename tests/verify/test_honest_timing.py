"""Honest timing: no spinning thread pools, load and CPU recorded with every latency, a busy-machine
warning, speedups against the same runtime's FP32 artifact, and gates that name their baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.report.document import build_report
from pipeline.report.markdown import render_markdown
from pipeline.stages import get_stage
from pipeline.stages.base import Artifact
from pipeline.stages.verify import VerifyConfig
from pipeline.verify import machine
from pipeline.verify.gates import GatesConfig, SpeedupGate, evaluate_gates

ROOT = Path(__file__).resolve().parents[2]
FAST = {"batch_sizes": [1], "warmup": 1, "iterations": 6}


def _row(artifact, backend, speed, fp32=None, vs=None):
    return {"artifact": artifact, "backend": backend, "size_bytes": 1, "accuracy": {},
            "latency": {"1": {"p50_ms": 1.0}},
            "speedup": {"1": {"ratio": speed, "ci95": [speed, speed], "vs": "original@torch"}},
            "speedup_fp32": {} if fp32 is None else {"1": {"ratio": fp32, "ci95": [fp32, fp32],
                                                           "vs": f"onnx_fp32@{backend}"}},
            "speedup_vs": vs or {}, "memory": {}}


ROWS = [_row("original", "torch", 1.0),
        _row("onnx_fp32", "onnxruntime", 3.0),
        _row("onnx_int8", "onnxruntime", 4.5, fp32=1.5,
             vs={"onnx_fp32": {"1": {"ratio": 1.5, "ci95": [1.4, 1.6], "vs": "onnx_fp32@onnxruntime"}}})]


def test_plain_min_speedup_keeps_its_meaning():
    (gate,) = evaluate_gates(GatesConfig(min_speedup=4.0), ROWS, ["onnx_int8"])
    assert gate.passed and gate.value == 4.5 and "vs original@torch" in gate.detail


@pytest.mark.parametrize("vs, passed, value", [("fp32", False, 1.5), ("onnx_fp32", False, 1.5),
                                               ("original", True, 4.5)])
def test_min_speedup_names_its_baseline(vs, passed, value):
    cfg = GatesConfig(min_speedup={"value": 2.0, "vs": vs})
    assert isinstance(cfg.min_speedup, SpeedupGate) and cfg.speedup_vs == vs
    (gate,) = evaluate_gates(cfg, ROWS, ["onnx_int8"])
    assert (gate.passed, gate.value, gate.threshold) == (passed, value, 2.0)


def test_speedup_against_an_unmeasured_baseline_fails_as_not_measured():
    (gate,) = evaluate_gates(GatesConfig(min_speedup={"value": 1.0, "vs": "trt_int8"}), ROWS, ["onnx_int8"])
    assert not gate.passed and gate.value is None and "not measured" in gate.detail
    (gate,) = evaluate_gates(GatesConfig(min_speedup={"value": 1.0, "vs": "fp32"}), ROWS, ["onnx_fp32"])
    assert not gate.passed and "no FP32 artifact" in gate.detail


@pytest.mark.parametrize("bad", [0, -1.0, {"value": 0}, {"value": 2, "vs": ""}, {"vs": "fp32"},
                                 {"value": 2, "vs": "x", "extra": 1}])
def test_bad_speedup_gates_are_refused(bad):
    with pytest.raises(ValidationError):
        GatesConfig(min_speedup=bad)


def test_busy_means_load_above_cores():
    assert machine.conditions(1.0, 1.5, cores=2)["busy"] is False
    assert machine.conditions(1.0, 2.5, cores=2)["busy"] is True
    assert machine.conditions(None, None, cores=2)["busy"] is False
    # a sweep paused its other trials: the 1-minute average still remembers them, runnable does not
    quiet = machine.conditions(3.5, 3.4, cores=2, paused=1, runnable=[2, 3])
    assert quiet["busy"] is False and quiet["paused_trials"] == 1 and quiet["runnable"] == [2, 3]
    assert machine.conditions(0.5, 0.5, cores=2, paused=0, runnable=[2, 6])["busy"] is True
    assert machine.conditions(3.5, 3.5, cores=2, paused=0, runnable=[None, None])["busy"] is True
    info = machine.cpu_info()
    assert info["cores"] >= 1 and isinstance(info["cpu_model"], str)
    assert set(info["cpu_flags"]) <= set(machine.INTERESTING_FLAGS)


def test_ort_sessions_do_not_spin(tmp_path, tiny_model):
    pytest.importorskip("onnxruntime")
    import torch

    from pipeline.backends import onnxruntime as ort_backend
    from pipeline.export.onnx import export_onnx

    path = export_onnx(tiny_model, torch.randn(1, 1, 16, 16), tmp_path / "m.onnx")
    session = ort_backend.load(path, threads=1)
    assert session.describe()["spinning"] is False
    opts = session._session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "export left a temp folder"


def test_cli_sets_passive_openmp_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    env["PYTHONPATH"] = str(ROOT)
    code = ("import sys; from pipeline import cli; sys.argv=['fmap','--version'];\n"
            "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
            "import os; print(os.environ['OMP_WAIT_POLICY'], os.environ['KMP_BLOCKTIME'], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split()[-3:] == ["PASSIVE", "0", "False"], out.stderr[-1000:]


def test_verify_records_machine_and_fp32_speedup(tiny_model, tiny_data, make_ctx, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import torch

    from pipeline.export.onnx import export_onnx

    ctx = make_ctx(tiny_model, tiny_data)
    fp32 = export_onnx(tiny_model, torch.randn(1, 1, 16, 16), tmp_path / "model_fp32.onnx")
    copy = tmp_path / "model_copy.onnx"
    copy.write_bytes(fp32.read_bytes())
    ctx.artifacts["onnx_fp32"] = Artifact(fp32, "onnx", "fp32")
    ctx.artifacts["onnx_other"] = Artifact(copy, "onnx", "int8")  # stands in for a compressed artifact
    loads = iter([5.0, 6.0])
    monkeypatch.setattr("pipeline.stages.verify.load_average", lambda: next(loads))
    monkeypatch.setattr("pipeline.stages.verify.cpu_info",
                        lambda: {"cpu_model": "Test CPU", "cpu_flags": ["avx2"], "cores": 2})
    cfg = VerifyConfig(backends=["torch", "onnxruntime"], latency=FAST,
                       gates={"min_speedup": {"value": 0.01, "vs": "onnx_fp32"}})
    res = get_stage("verify")().run(ctx, cfg)
    json.dumps(res.metrics)
    rows = {(r["artifact"], r["backend"]): r for r in res.metrics["results"]}
    other = rows[("onnx_other", "onnxruntime")]
    assert other["speedup_fp32"]["1"]["vs"] == "onnx_fp32@onnxruntime"
    assert other["speedup_vs"]["onnx_fp32"]["1"]["ratio"] > 0
    assert rows[("onnx_fp32", "onnxruntime")]["speedup_fp32"] == {}  # the reference itself
    assert other["latency"]["1"]["load_avg_1m"] == [5.0, 6.0] and other["latency"]["1"]["busy"] is True
    m = res.metrics["machine"]
    assert m["busy"] and m["cpu_model"] == "Test CPU" and m["conditions"]["1"]["cores"] == 2
    (gate,) = res.gates
    assert gate.passed and "vs onnx_fp32@onnxruntime" in gate.detail

    manifest = {"status": "ok", "stages": [{"id": "verify", "kind": "verify", "status": "ok",
                                            "metrics": res.metrics, "gates": [g.to_dict() for g in res.gates]}]}
    report = build_report(manifest)
    assert report["summary"]["busy_machine"] and report["machine"]["cpu_flags"] == ["avx2"]
    row = next(r for r in report["artifacts"] if r["artifact"] == "onnx_other")
    assert row["speedup_fp32_vs"] == "onnx_fp32@onnxruntime" and row["busy"] is True
    md = render_markdown(report)
    assert "busy machine" in md and "load average up to 6.0 on 2 cores" in md and "vs same-runtime FP32" in md
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "pipeline" / "report" / "report.schema.json").read_text())
    jsonschema.validate(report, schema)


def test_isolate_times_each_artifact_in_its_own_process(tiny_model, tiny_data, make_ctx, tmp_path, monkeypatch):
    """Real child processes: the original rebuilt from the recipe's model config, ONNX by path."""
    pytest.importorskip("onnxruntime")
    import torch

    from pipeline.export.onnx import export_onnx
    from pipeline.recipe_models import ModelConfig
    from pipeline.verify import isolated

    ctx = make_ctx(tiny_model, tiny_data)
    ctx.model_spec = ModelConfig(source="python:conftest:TinyCNN", input_shape=[1, 1, 16, 16])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    fp32 = export_onnx(tiny_model, torch.randn(1, 1, 16, 16), tmp_path / "model_fp32.onnx")
    ctx.artifacts["onnx_fp32"] = Artifact(fp32, "onnx", "fp32")
    specs = []
    real = isolated.time_in_subprocess

    def spy(spec, batch, timeout_s=900):
        specs.append(spec)
        return real(spec, batch, timeout_s)

    monkeypatch.setattr(isolated, "time_in_subprocess", spy)
    cfg = VerifyConfig(backends=["torch", "onnxruntime"], latency={**FAST, "isolate": True})
    res = get_stage("verify")().run(ctx, cfg)
    rows = {(r["artifact"], r["backend"]): r for r in res.metrics["results"]}
    assert {s["backend"] for s in specs} == {"torch", "onnxruntime"} and len(specs) == 2
    assert next(s for s in specs if s["backend"] == "torch")["model"]["source"] == ctx.model_spec.source
    onnx = rows[("onnx_fp32", "onnxruntime")]
    assert onnx["latency"]["1"]["iterations"] == 6 and onnx["speedup"]["1"]["paired"] is False
    assert "error" not in rows[("original", "torch")]["latency"]["1"]


def test_isolated_child_failure_is_reported_not_raised(tmp_path):
    import numpy as np

    from pipeline.verify.isolated import time_in_subprocess

    with pytest.raises(RuntimeError, match="isolated timing process failed"):
        time_in_subprocess({"backend": "onnxruntime", "artifact": str(tmp_path / "missing.onnx"), "threads": 1,
                            "warmup": 0, "iterations": 5}, np.zeros((1, 1, 4, 4), np.float32))
