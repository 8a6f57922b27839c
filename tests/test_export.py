"""Export: equivalence on residual/depthwise/concat nets, distinct biases, tolerance, bad files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from pipeline.errors import BadInput, StageFailed
from pipeline.export.onnx import (check_equivalence, compare_outputs, export_onnx, load_onnx,
                                  make_initializers_distinct)
from pipeline.sources.data import DataBundle, TensorSplit
from pipeline.stages.export import ExportConfig, ExportStage


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return self.fc(torch.relu(self.b(a) + a).mean((2, 3)))


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(3, 4, 3, padding=1)
        self.right = nn.Conv2d(3, 6, 1)
        self.fc = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.left(x)), torch.sigmoid(self.right(x))], dim=1)
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("cls", [Residual, Depthwise, Concat])
def test_export_matches_torch(cls, tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(cls())
    x = torch.randn(4, 3, 12, 12)
    path = export_onnx(model, x[:1], tmp_path / "m.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    eq = check_equivalence(path, model, [x, torch.randn(3, 3, 12, 12)])  # batch 4 then 3: dynamic batch
    assert eq.passed and eq.samples == 7
    assert eq.max_abs_diff < 1e-4


def test_zero_biases_become_distinct_initializers(tmp_path):
    """Untrained BN folds to all-zero conv biases, which the exporter dedups; each conv must own one."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "r18.onnx", simplify=False)
    graph = onnx.load(str(path)).graph
    inits = {t.name for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    biases = [n.input[2] for n in convs]
    assert all(b in inits for b in biases), "every Conv/Gemm bias must be an initializer"
    assert len(set(biases)) == len(biases) == 21
    assert not [n for n in graph.node if n.op_type == "Identity"]


def test_make_distinct_copies_shared_initializer():
    from onnx import TensorProto, helper, numpy_helper

    zero = numpy_helper.from_array(np.zeros(2, np.float32), "b")
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="c1"),
             helper.make_node("Identity", ["b"], ["b2"], name="id"),
             helper.make_node("Conv", ["y", "w", "b2"], ["z"], name="c2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 4, 4])], [zero, w])
    model = helper.make_model(g)
    assert make_initializers_distinct(model) >= 2
    ins = [list(n.input) for n in model.graph.node if n.op_type == "Conv"]
    assert ins[0][1] != ins[1][1] and ins[0][2] != ins[1][2]
    assert not [n for n in model.graph.node if n.op_type == "Identity"]


def test_compare_is_polygraphy_style():
    ref = np.array([1.0, 100.0, 0.0])
    # 100 -> 100.05: abs 0.05 > atol but rel 5e-4 < rtol: passes. 0 -> 1e-5: abs ok.
    assert compare_outputs(ref, np.array([1.0, 100.05, 1e-5]), atol=1e-4, rtol=1e-3).mismatched == 0
    assert compare_outputs(ref, np.array([1.01, 100.0, 0.0]), atol=1e-4, rtol=1e-3).mismatched == 1
    nan = compare_outputs(ref, np.array([np.nan, 100.0, 0.0]), atol=1.0, rtol=1.0)
    assert nan.nan == 1 and not nan.passed


def test_stage_registers_artifact_and_reports(tiny_model, tiny_data, make_ctx):
    ctx = make_ctx(tiny_model, tiny_data)
    result = ExportStage().run(ctx, ExportConfig())
    art = result.artifacts["onnx_fp32"]
    assert art.kind == "onnx" and art.precision == "fp32" and art.path.is_file()
    eq = result.metrics["onnx"]["equivalence"]
    assert eq["passed"] and eq["samples"] == 64 and eq["max_abs_diff"] < 1e-4
    assert "onnx_fp32" not in ctx.artifacts  # the runner records artifacts, not the stage


def test_stage_fails_above_tolerance(tiny_model, tiny_data, make_ctx, monkeypatch):
    """A model whose ONNX differs from torch (here: torch output perturbed after export) -> exit 3."""
    import pipeline.export.onnx as onnx_mod

    real = onnx_mod.check_equivalence

    def perturbed(path, model, inputs, **kw):
        class Shifted(nn.Module):
            def forward(self, x):
                return model(x) + 0.01
        return real(path, Shifted(), inputs, **kw)

    monkeypatch.setattr(onnx_mod, "check_equivalence", perturbed)
    with pytest.raises(StageFailed, match="differs from torch"):
        ExportStage().run(make_ctx(tiny_model, tiny_data), ExportConfig())


def test_no_calibration_uses_example_input(tiny_model, make_ctx):
    x = torch.randn(2, 1, 16, 16)
    ctx = make_ctx(tiny_model, DataBundle(eval=TensorSplit("e", x, None)), example_input=x[:1])
    ctx.data.calibration = None
    result = ExportStage().run(ctx, ExportConfig())
    assert result.metrics["onnx"]["equivalence"]["samples"] == 1


def test_missing_and_corrupt_onnx_are_bad_input(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(BadInput, match=str(missing)):
        load_onnx(missing)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all \x00\x01")
    with pytest.raises(BadInput, match=str(bad)):
        load_onnx(bad)


def test_tensorrt_hook_runs_after_export(tiny_model, tiny_data, make_ctx):
    """With `tensorrt:` set the export stage calls build_engines; without a GPU it is a visible skip."""
    from pipeline.export.tensorrt import tensorrt_unavailable_reason

    result = ExportStage().run(make_ctx(tiny_model, tiny_data), ExportConfig(tensorrt={"precision": "fp16"}))
    assert "onnx_fp32" in result.artifacts and "tensorrt" in result.metrics
    if tensorrt_unavailable_reason():
        assert result.metrics["tensorrt"]["status"] == "skipped"
