"""`visualize` on compiled graphs (issue 15): an ONNX file (and a TorchScript program through its ONNX
view) shows the same feature maps as its torch source, read from onnxruntime; Grad-CAM is refused
with one stated reason while the rest works; the stage compares INT8/FP32 ONNX artifacts with it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.errors import BadInput
from pipeline.sources.onnx_module import OnnxModule
from pipeline.stages.base import Artifact
from pipeline.stages.visualize import VisualizeConfig, VisualizeStage
from pipeline.visualize import graph_maps
from pipeline.visualize.featuremaps import capture
from test_visualize import PLANTED, PlantedNet, square_images


@pytest.fixture(scope="module")
def planted_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("graph") / "planted.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(PlantedNet().eval(), (torch.zeros(1, 1, 24, 24),), str(path), dynamo=False,
                          input_names=["img"], dynamic_axes={"img": {0: "n"}})
    return path


def test_layers_are_the_torch_module_paths_and_unknown_ones_name_close_matches(planted_onnx):
    assert graph_maps.conv_layers(planted_onnx) == ["conv", "head"]
    assert graph_maps.resolve_layers(planted_onnx, None) == ["conv", "head"]
    with pytest.raises(BadInput, match="did you mean: conv"):
        graph_maps.resolve_layers(planted_onnx, ["conv_x"])


def test_onnx_feature_maps_equal_the_torch_ones(planted_onnx):
    x, _ = square_images()
    logits, acts = graph_maps.capture(planted_onnx, x, ["conv", "head"], threads=1)
    ref_logits, ref_acts = capture(PlantedNet().eval(), x, ["conv", "head"])
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    for layer in ("conv", "head"):
        torch.testing.assert_close(acts[layer], ref_acts[layer], atol=1e-4, rtol=1e-4)


def test_fmap_visualize_on_an_onnx_file_finds_the_planted_channel_without_gradcam(planted_onnx, tmp_path):
    import numpy as np

    from pipeline.commands.visualize import visualize

    x, _ = square_images(4)
    np.savez(tmp_path / "sq.npz", x=x.numpy(), y=np.zeros(4, dtype=np.int64))
    out = tmp_path / "out"
    res = CliRunner().invoke(visualize, [f"onnx:{planted_onnx}", "--images", str(tmp_path / "sq.npz"),
                                         "--out", str(out), "--top-k", "2", "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert metrics["layers"]["conv"]["top_channels"][0][0] == PLANTED and metrics["graph"] == "onnx"
    assert metrics["gradcam"].startswith("skipped: onnxruntime computes no gradients")
    assert "Grad-CAM skipped" in res.stderr and len([l for l in res.stderr.splitlines() if "Grad-CAM" in l]) == 1
    assert (out / "visualize" / "featuremaps_conv.png").stat().st_size > 1000
    assert (out / "visualize" / "overlay_head.png").is_file()
    assert not list((out / "visualize").glob("gradcam_*")) and (out / "qa.html").read_text().count("<tr ") == 4


def test_stage_on_an_onnx_model_compares_its_artifacts(planted_onnx, make_ctx, tmp_path):
    from pipeline.sources.data import DataBundle, TensorSplit

    x, _ = square_images()
    ctx = make_ctx(OnnxModule(planted_onnx), DataBundle(eval=TensorSplit("eval", x, None, batch_size=3)))
    ctx.artifacts["onnx_fp32"] = Artifact(planted_onnx, "onnx", "fp32")
    res = VisualizeStage().run(ctx, VisualizeConfig(images=6, min_attention_similarity=0.99))
    sim = res.metrics["similarity"]["onnx_fp32"]
    assert sim["method"] == "featuremap" and sim["mean"] > 0.999 and sim["agreement"] == 1.0
    assert list(sim["layers"]) == ["conv", "head"] and all(g.passed for g in res.gates)
    assert res.metrics["scaling"].startswith("skipped:") and "featuremaps_head" in res.artifacts


def test_stage_on_a_torchscript_program_reads_its_onnx_view(make_ctx, tmp_path):
    from pipeline.sources.data import DataBundle, TensorSplit

    x, _ = square_images()
    from pipeline.sources.models import build_model, model_config_from_string

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(PlantedNet().eval(), x[:1]), str(tmp_path / "planted.ts"))
    scripted = build_model(model_config_from_string(f"torchscript:{tmp_path / 'planted.ts'}"))
    ctx = make_ctx(scripted, DataBundle(eval=TensorSplit("eval", x, None, batch_size=3)), example_input=x[:1])
    res = VisualizeStage().run(ctx, VisualizeConfig(images=6, layers=["conv"], top_k=2, compare=False))
    assert res.metrics["layers"]["conv"]["top_channels"][0][0] == PLANTED
    assert (ctx.run_dir / "visualize" / "graph_view.onnx").is_file()
