"""Feature-map QA: planted-feature detection, Grad-CAM localisation, similarity, gate, layer errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.errors import BadInput
from pipeline.sources.data import DataBundle, TensorSplit
from pipeline.stages.base import Artifact
from pipeline.stages.visualize import VisualizeConfig, VisualizeStage
from pipeline.visualize.featuremaps import capture, default_layers, resolve_layers, top_channels
from pipeline.visualize.gradcam import grad_cam
from pipeline.visualize.similarity import featuremap_similarity, pearson, summarize, top_region_iou

PLANTED = 2  # the channel of `PlantedNet.conv` that detects bright squares


class PlantedNet(nn.Module):
    """conv(1->4) -> relu -> conv(4->4) -> relu -> avgpool -> fc, built by hand.

    conv channel 2 sums a 3x3 neighbourhood minus a threshold, so it fires only on a bright square;
    the other channels have a strongly negative bias. Class 0's logit reads channel 2, so Grad-CAM
    for class 0 must light up the square.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.fill_(-5.0)
            self.conv.weight[PLANTED] = 1.0
            self.conv.bias[PLANTED] = -4.0  # 9 bright pixels (value 1) -> 5; noise (~0.1) -> < 0
            self.head.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
            self.head.bias.zero_()
            self.fc.weight.zero_()
            self.fc.weight[0, PLANTED] = 1.0
            self.fc.weight[1, PLANTED] = -1.0
            self.fc.bias.copy_(torch.tensor([0.0, 0.2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv(x))
        b = torch.relu(self.head(a))
        return self.fc(b.mean(dim=(2, 3)))


def square_images(n: int = 6, size: int = 24, side: int = 5) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Dim noise with one bright square per image at a varying position; returns (x, top-left corners)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, generator=g) * 0.1
    corners = []
    for i in range(n):
        r, c = 2 + (i * 5) % (size - side - 4), 3 + (i * 7) % (size - side - 6)
        x[i, 0, r:r + side, c:c + side] = 1.0
        corners.append((r, c))
    return x, corners


def test_strongest_channel_grid_finds_planted_channel():
    model = PlantedNet().eval()
    x, _ = square_images()
    _, acts = capture(model, x, ["conv"])
    top = top_channels(acts["conv"], k=3)
    assert top[0][0] == PLANTED
    assert top[0][1] > top[1][1]


def test_gradcam_peak_lies_on_the_square():
    model = PlantedNet().eval()
    x, corners = square_images()
    cams = grad_cam(model, x, "conv")
    assert (cams.targets == 0).all()  # the square drives class 0
    for cam_set in (cams.gradcam, cams.gradcam_pp):
        for cam, (r, c) in zip(cam_set, corners):
            py, px = divmod(int(cam.argmax()), cam.shape[-1])
            assert r - 1 <= py <= r + 5 and c - 1 <= px <= c + 5, (py, px, r, c)
            assert 0.0 <= float(cam.min()) and float(cam.max()) == pytest.approx(1.0)


def test_similarity_of_a_model_with_itself_is_one(tiny_model):
    x = torch.randn(5, 1, 16, 16)
    a = grad_cam(tiny_model, x, "conv3")
    b = grad_cam(copy.deepcopy(tiny_model), x, "conv3")
    assert torch.allclose(pearson(a.gradcam, b.gradcam), torch.ones(5), atol=1e-5)
    assert torch.allclose(top_region_iou(a.gradcam, b.gradcam), torch.ones(5))
    _, acts = capture(tiny_model, x, ["conv2"])
    assert torch.allclose(featuremap_similarity(acts["conv2"], acts["conv2"]), torch.ones(5), atol=1e-5)


def test_featuremap_similarity_ignores_per_channel_affine_but_not_shuffles():
    ref = torch.randn(3, 4, 8, 8)
    affine = ref * torch.tensor([2.0, 0.5, 3.0, 1.0]).view(1, 4, 1, 1) + 7.0  # what Conv+BN folding does
    assert torch.allclose(featuremap_similarity(ref, affine), torch.ones(3), atol=1e-5)
    assert featuremap_similarity(ref, torch.randn(3, 4, 8, 8)).abs().max() < 0.5


def test_summarize_reports_distribution_and_worst():
    s = summarize(np.array([0.9, 0.2, 1.0, 0.5]), worst=2)
    assert s["min"] == pytest.approx(0.2) and s["mean"] == pytest.approx(0.65)
    assert s["worst"] == [1, 3]
    json.dumps(s)


def test_unknown_layer_names_close_matches(tiny_model):
    with pytest.raises(BadInput, match=r"'conv33'.*did you mean: conv3"):
        resolve_layers(tiny_model, ["conv33"])
    assert resolve_layers(tiny_model, ["bn1"]) == ["bn1"]


def test_default_layers_spread_across_depth():
    model = nn.Sequential(*[nn.Conv2d(3, 3, 3) for _ in range(7)])
    assert default_layers(model) == ["0", "3", "6"]


def _ctx(make_ctx, model, n=12, labels=True):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 10, (n,), generator=g) if labels else None
    split = TensorSplit("eval", x, y, batch_size=5, num_classes=10)
    return make_ctx(model, DataBundle(eval=split))


def test_stage_writes_plots_gallery_and_json_metrics(make_ctx, tiny_model):
    ctx = _ctx(make_ctx, tiny_model)
    res = VisualizeStage().run(ctx, VisualizeConfig(images=7, top_k=4, layers=["conv1", "conv3"], scaling=False))
    m = res.metrics
    json.dumps(m)
    assert m["images"] == 7 and list(m["layers"]) == ["conv1", "conv3"]
    assert len(m["layers"]["conv1"]["top_channels"]) == 4
    assert m["similarity"] == {}  # nothing was compressed
    for key in ("featuremaps_conv1", "overlay_conv3", "gradcam_conv3"):
        assert res.artifacts[key].kind == "plot" and res.artifacts[key].path.stat().st_size > 1000
    html = res.artifacts["qa_gallery"].path.read_text()
    assert res.artifacts["qa_gallery"].kind == "report"
    assert html.count("<tr ") == 7 and "data:image/jpeg;base64," in html and "http" not in html


def test_gate_fails_when_artifact_is_a_different_model(make_ctx, tiny_model):
    ctx = _ctx(make_ctx, tiny_model)
    torch.manual_seed(123)
    ctx.model = type(tiny_model)().eval()  # "compressed" model replaced by different random weights
    res = VisualizeStage().run(ctx, VisualizeConfig(images=8, min_attention_similarity=0.8, scaling=False))
    sim = res.metrics["similarity"]["pruned"]
    assert sim["method"] == "gradcam" and sim["mean"] < 0.8 and len(sim["worst"]) == 5
    assert [g.passed for g in res.gates] == [False] and res.gates[0].artifact == "pruned"
    assert "worst_pruned" in res.artifacts


def test_gate_passes_for_identical_copy_and_fp32_onnx(make_ctx, tiny_model, tmp_path: Path):
    ctx = _ctx(make_ctx, tiny_model, labels=False)
    ctx.model = copy.deepcopy(tiny_model)
    with torch.no_grad():  # a tiny perturbation: a "compressed" model that changed almost nothing
        ctx.model.conv3.weight.mul_(1.001)
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(tiny_model, (ctx.example_input,), str(onnx_path), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    ctx.artifacts["onnx_fp32"] = Artifact(onnx_path, "onnx", "fp32")
    res = VisualizeStage().run(ctx, VisualizeConfig(images=6, min_attention_similarity=0.95, scaling=False))
    s = res.metrics["similarity"]
    assert s["pruned"]["mean"] > 0.99
    assert s["onnx_fp32"]["method"] == "featuremap" and s["onnx_fp32"]["mean"] > 0.999
    assert s["onnx_fp32"]["layers"]["conv1"] == "/conv1/Conv_output_0"  # BN folded into the conv
    assert s["onnx_fp32"]["agreement"] == 1.0
    assert all(g.passed for g in res.gates) and len(res.gates) == 2


def test_stage_unknown_layer_is_bad_input(make_ctx, tiny_model):
    with pytest.raises(BadInput, match="did you mean"):
        VisualizeStage().run(_ctx(make_ctx, tiny_model), VisualizeConfig(layers=["conv_1"]))


def test_optional_extras_skip_visibly_or_plot(make_ctx, tiny_model, monkeypatch):
    import pipeline.profiling

    def fake_summarize(model, x):  # linear in pixels and batch, as the real formulas are
        px = x.shape[0] * x.shape[-1] * x.shape[-2]
        return {"macs": 100 * px, "params": 10, "liveness_peak_bytes": 4 * px}

    monkeypatch.setattr(pipeline.profiling, "summarize", fake_summarize)
    ctx = _ctx(make_ctx, tiny_model)
    res = VisualizeStage().run(ctx, VisualizeConfig(images=3, gradcam=False, compare=False, tensorboard=True))
    table = res.metrics["scaling"]
    assert [r["batch"] for r in table["batch"]][:3] == [1, 2, 4]
    assert table["batch"][2]["peak_bytes"] == 4 * table["batch"][0]["peak_bytes"]
    assert res.artifacts["scaling"].path.exists()
    tb = res.metrics["tensorboard"]
    assert tb.startswith("skipped:") or (ctx.run_dir / tb).is_dir()
    assert not any(k.startswith("gradcam_") for k in res.artifacts)
