"""VerifyStage on the tiny model: torch always, onnxruntime when its backend module can run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.errors import BadInput
from pipeline.sources.data import DataBundle, TensorSplit
from pipeline.stages import get_stage
from pipeline.stages.base import Artifact
from pipeline.stages.verify import VerifyConfig

FAST = {"batch_sizes": [1, 4], "warmup": 1, "iterations": 6}


def _run(ctx, **cfg):
    stage = get_stage("verify")()
    return stage.run(ctx, VerifyConfig(latency=FAST, **cfg))


def test_original_on_torch_measured_and_json_serialisable(tiny_model, tiny_data, make_ctx):
    res = _run(make_ctx(tiny_model, tiny_data), backends=["torch"], gates={"min_agreement": 0.99})
    json.dumps(res.metrics)  # metrics must be plain JSON
    (row,) = res.metrics["results"]
    assert (row["artifact"], row["backend"], row["baseline"]) == ("original", "torch", True)
    assert row["accuracy"]["agreement"] == 1.0 and row["accuracy"]["max_abs_err"] == 0.0
    assert row["accuracy"]["samples"] == 64 and 0.0 <= row["accuracy"]["top1"] <= 1.0
    assert row["accuracy"]["top5"] is not None  # 10 classes > 5
    for bs in ("1", "4"):
        lat = row["latency"][bs]
        assert lat["iterations"] == 6 and lat["ci95_ms"][0] <= lat["p50_ms"] <= lat["ci95_ms"][1]
        assert row["speedup"][bs]["ratio"] == 1.0
    assert row["size_bytes"] == sum(t.numel() * 4 for t in tiny_model.state_dict().values() if t.is_floating_point()) + 16
    assert res.metrics["threads"] == 2 and res.metrics["deployable"] == "original"
    assert [g.passed for g in res.gates] == [True]


def test_changed_model_is_measured_as_pruned_and_gated(tiny_model, tiny_data, make_ctx):
    ctx = make_ctx(tiny_model, tiny_data)
    with torch.no_grad():
        ctx.model.fc.weight.mul_(-1.0)  # flips decisions: agreement must drop
    res = _run(ctx, backends=["torch"], gates={"min_agreement": 0.99, "max_accuracy_drop": 0.5})
    rows = {r["artifact"]: r for r in res.metrics["results"]}
    assert set(rows) == {"original", "pruned"} and res.metrics["deployable"] == "pruned"
    assert rows["pruned"]["accuracy"]["agreement"] < 0.5 and rows["pruned"]["accuracy"]["max_abs_err"] > 0
    gates = {g.name: g for g in res.gates}
    assert gates["min_agreement"].artifact == "pruned@torch" and not gates["min_agreement"].passed
    assert gates["max_accuracy_drop"].passed


def test_unavailable_backend_is_listed_not_faked(tiny_model, tiny_data, make_ctx, tmp_path):
    ctx = make_ctx(tiny_model, tiny_data)
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    ctx.artifacts["trt_fp16"] = Artifact(engine, "tensorrt", "fp16")
    res = _run(ctx, backends=["torch", "tensorrt"], gates={"min_speedup": 1.0})
    if not torch.cuda.is_available():
        assert any(u["backend"] == "tensorrt" and u["reason"] for u in res.metrics["unavailable"])
    assert all(r["backend"] != "tensorrt" for r in res.metrics["results"]) or torch.cuda.is_available()
    (gate,) = res.gates  # gate on the deployable engine: unmeasured -> fails, with the reason
    assert gate.artifact == "trt_fp16" and not gate.passed and gate.value is None


def test_unlabelled_eval_gives_agreement_only_and_rejects_accuracy_gate(tiny_model, make_ctx):
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    data = DataBundle(eval=TensorSplit("nolabels", x, None, batch_size=4))
    res = _run(make_ctx(tiny_model, data), backends=["torch"])
    acc = res.metrics["results"][0]["accuracy"]
    assert acc["top1"] is None and acc["top5"] is None and acc["agreement"] == 1.0
    with pytest.raises(BadInput, match="labelled"):
        _run(make_ctx(tiny_model, data), backends=["torch"], gates={"max_accuracy_drop": 0.01})


def test_onnx_artifact_on_onnxruntime(tiny_model, tiny_data, make_ctx, tmp_path):
    from pipeline.backends import available

    if available("onnxruntime"):
        pytest.skip(f"onnxruntime backend: {available('onnxruntime')}")
    ctx = make_ctx(tiny_model, tiny_data)
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(tiny_model, (ctx.example_input,), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    ctx.artifacts["onnx_fp32"] = Artifact(path, "onnx", "fp32")
    res = _run(ctx, backends=["torch", "onnxruntime"], gates={"min_agreement": 0.99, "max_size_mb": 1.0})
    rows = {(r["artifact"], r["backend"]): r for r in res.metrics["results"]}
    ort = rows[("onnx_fp32", "onnxruntime")]
    assert ort["accuracy"]["agreement"] == 1.0 and ort["accuracy"]["max_abs_err"] < 1e-4
    assert ort["size_bytes"] == path.stat().st_size and ort["speedup"]["4"]["ratio"] > 0
    assert ort["session"].get("backend") in ("onnxruntime", None)
    assert res.metrics["deployable"] == "onnx_fp32"
    assert {g.artifact for g in res.gates} == {"onnx_fp32", "onnx_fp32@onnxruntime"}
    assert all(g.passed for g in res.gates)


def test_accuracy_reports_confident_agreement_and_logits_sqnr():
    """Near-ties flip top-1 without meaning much: the confident subset and the SQNR say so."""
    import numpy as np

    from pipeline.verify.accuracy import AccuracyAccumulator

    ref = np.array([[5.0, 0.0, 0.0], [1.0, 0.9, 0.0], [0.0, 0.0, 4.0], [0.2, 0.1, 0.0]])
    out = ref.copy()
    out[1] = [0.9, 1.0, 0.0]  # a near-tie flips
    out[3] = [0.1, 0.2, 0.0]  # another one
    acc = AccuracyAccumulator()
    acc.update(out, ref, None)
    r = acc.result()
    assert r["agreement"] == 0.5 and r["confident_samples"] == 2 and r["agreement_confident"] == 1.0
    noise = ((out - ref) ** 2).sum()
    assert r["sqnr_db"] == pytest.approx(10 * np.log10((ref ** 2).sum() / noise), abs=1e-3)
    same = AccuracyAccumulator()
    same.update(ref, ref, None)
    assert same.result()["sqnr_db"] == 200.0  # identical outputs stay valid JSON


def test_torch_session_owns_its_threads_and_closes_with_with():
    """A session runs with its own thread count inside infer and leaves the process's as it was."""
    from pipeline.backends import get_backend

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x.flatten(1)

    before = torch.get_num_threads()
    mine = 1 if before != 1 else 2
    with get_backend("torch").load(Probe(), threads=mine) as session:
        assert torch.get_num_threads() == before  # loading changes nothing
        session.infer(np.zeros((1, 1, 2, 2), np.float32))
        assert seen == [mine] and torch.get_num_threads() == before
        assert session.describe()["threads"] == mine
    assert session.model is None  # released on leaving the block
