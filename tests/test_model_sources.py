"""The model sources beyond torchvision/builtin: python files, ONNX, TorchScript, torch.export, timm.

Each source builds a module that runs; each way a user's file can be wrong is BadInput (exit 2)
with one line.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from pipeline.errors import BadInput
from pipeline.sources.models import build_model, default_input_shape, model_config_from_string

MODEL_PY = '''
import torch
from torch import nn


def tiny_net(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, num_classes))
'''


def tiny_net() -> torch.nn.Module:
    namespace: dict = {}
    exec(compile(MODEL_PY, "tinynet.py", "exec"), namespace)  # the same code the .py file holds
    return namespace["tiny_net"]().eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The tiny model as a .py file, an ONNX file, a TorchScript file and a torch.export .pt2."""
    d = tmp_path_factory.mktemp("models")
    (d / "tinynet.py").write_text(MODEL_PY)
    (d / "broken.py").write_text("import no_such_dependency_xyz\n")
    model, x = tiny_net(), torch.randn(1, 3, 24, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(d / "tiny.onnx"), dynamo=False, input_names=["img"],
                          output_names=["logits"])
        torch.jit.save(torch.jit.trace(model, x), str(d / "tiny.ts"))
    torch.export.save(torch.export.export(model, (x,)), str(d / "tiny.pt2"))
    torch.save(model.state_dict(), d / "state_dict.pt")
    return {p.name: p for p in d.iterdir()}


def fill(spec: str, files: dict[str, Path]) -> str:
    for name, path in files.items():
        spec = spec.replace("{" + name + "}", str(path))
    return spec


@pytest.mark.parametrize("spec", ["python:{tinynet.py}:tiny_net", "onnx:{tiny.onnx}", "torchscript:{tiny.ts}",
                                  "exported:{tiny.pt2}", "{tiny.onnx}", "{tinynet.py}:tiny_net"])
def test_every_source_builds_the_same_function(files, spec):
    spec = fill(spec, files)
    cfg = model_config_from_string(spec)
    model = build_model(cfg)
    x = torch.randn(4, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny_net()(x), atol=1e-4, rtol=1e-4)
    if spec.startswith(("onnx:", "exported:", str(files["tiny.onnx"]))):
        assert default_input_shape(cfg) == [1, 3, 24, 24]  # read from the file itself


def test_python_module_beside_the_recipe_imports_without_pythonpath(files):
    cfg = model_config_from_string("python:tinynet:tiny_net")
    model = build_model(cfg, base_dir=files["tinynet.py"].parent)
    assert isinstance(model, torch.nn.Sequential)


@pytest.mark.parametrize("spec,fragment", [
    ("onnx:{tinynet.py}", "fails onnx.checker"),
    ("onnx:/no/such.onnx", "does not exist"),
    ("torchscript:{state_dict.pt}", "not a TorchScript module"),
    ("exported:{tiny.ts}", "not a torch.export program"),
    ("python:{tinynet.py}:tiny", r"no callable 'tiny' \(did you mean tiny_net"),
    ("python:{broken.py}:f", "importing .*broken.py' failed: ModuleNotFoundError"),
    ("python:/no/such/file.py:f", "does not exist"),
    ("nosuch:thing", "expected 'torchvision:NAME'.*'onnx:PATH'"),
])
def test_bad_files_are_one_line_bad_input(files, spec, fragment):
    spec = fill(spec, files)
    with pytest.raises(BadInput, match=fragment) as info:
        build_model(model_config_from_string(spec))
    assert "\n" not in str(info.value)


def test_weights_do_not_apply_to_graph_files(files):
    cfg = model_config_from_string(f"onnx:{files['tiny.onnx']}", weights=str(files["state_dict.pt"]))
    with pytest.raises(BadInput, match="weights are inside the file"):
        build_model(cfg)


def test_onnx_graph_profile_matches_the_torch_profiler(files):
    """MACs and parameters read from the ONNX graph agree with the torch trace of the same model
    (BatchNorm is folded into the conv by the exporter, so its 2*8 affine params and one MAC per
    output value are the only difference)."""
    from pipeline.profiling.onnx_graph import profile_onnx
    from pipeline.profiling.model_profile import profile_model

    onnx_prof = profile_onnx(files["tiny.onnx"], [2, 3, 24, 24])
    torch_prof = profile_model(tiny_net(), torch.randn(2, 3, 24, 24), measure=False)
    bn_macs = 2 * 8 * 24 * 24
    assert onnx_prof["totals"]["macs"] == torch_prof["totals"]["macs"] - bn_macs
    assert onnx_prof["totals"]["params"] == torch_prof["totals"]["params"] - 2 * 8
    convs = [r for r in onnx_prof["layers"] if r["type"] == "Conv"]
    assert [r["output_shape"] for r in convs] == [[2, 8, 24, 24], [2, 16, 12, 12]]
    assert convs[1]["receptive_field"] == 8 and convs[1]["stride"] == 2
    # the peak is the first conv's output alive while ReLU writes its own: 2 x 2*8*24*24 floats
    assert onnx_prof["memory"]["liveness_peak_bytes"] == 2 * (2 * 8 * 24 * 24 * 4)


def test_onnx_node_names_map_to_module_paths():
    from pipeline.profiling.onnx_graph import module_path

    assert module_path("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert module_path("/features/features.3/Relu") == "features.3"
    assert module_path("Conv_12") == "Conv_12"


timm = pytest.importorskip("timm", reason="timm is an optional extra: pip install 'fmap[timm]'")


def test_timm_model_by_name_with_its_config_shape():
    cfg = model_config_from_string("timm:test_resnet")
    assert default_input_shape(cfg) == [1, 3, 160, 160]
    model = build_model(cfg)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_unknown_timm_name_suggests():
    with pytest.raises(BadInput, match=r"timm:resnet_18' does not exist.*did you mean resnet18"):
        build_model(model_config_from_string("timm:resnet_18"))
