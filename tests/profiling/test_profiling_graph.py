"""Traced shapes agree with the closed-form formulas on real torchvision models; MACs, RF, fallback."""

import pytest
import torch
import torchvision
from torch import nn

from pipeline.profiling import formulas as F
from pipeline.profiling.graph import following_activation, trace_graph


def _check_formulas(graph):
    checked = 0
    for node in graph.nodes:
        m = node.module
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            src = next(n for n in graph.nodes if n.name == node.inputs[0]) if node.inputs[0] != "input" else None
            in_hw = src.output_shape[-2:] if src else graph_input_hw
            for dim in (0, 1):
                if isinstance(m, nn.Conv2d):
                    want = F.conv_output_size(in_hw[dim], m.kernel_size[dim], m.stride[dim], m.padding[dim],
                                              m.dilation[dim])
                else:
                    k, s, p = (v if isinstance(v, int) else v[dim] for v in (m.kernel_size, m.stride, m.padding))
                    want = F.pool_output_size(in_hw[dim], k, s, p, ceil_mode=m.ceil_mode)
                assert node.output_shape[2 + dim] == want, node.name
            if isinstance(m, nn.Conv2d):
                kh, kw = m.kernel_size
                assert node.params == F.conv_params(kh, kw, m.in_channels, m.out_channels, m.groups,
                                                    m.bias is not None)
            checked += 1
    return checked


graph_input_hw = [96, 96]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "squeezenet1_0", "googlenet"])
def test_formula_equals_observed_shape(name):
    kw = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(weights=None, **kw).eval()
    graph = trace_graph(model, torch.randn(1, 3, *graph_input_hw))
    assert graph.method == "fx"
    assert _check_formulas(graph) >= 10


def test_resnet18_totals_and_receptive_field():
    model = torchvision.models.resnet18(weights=None).eval()
    graph = trace_graph(model, torch.randn(1, 3, 224, 224))
    assert graph.total_params == 11_689_512
    assert abs(sum(n.macs for n in graph.nodes) - 1.82e9) / 1.82e9 < 0.01  # the published 1.82 GMACs
    by = {n.name: n for n in graph.nodes}
    assert by["conv1"].receptive_field == (7, 7) and by["conv1"].stride == (2, 2)
    assert by["maxpool"].receptive_field == (11, 11) and by["maxpool"].stride == (4, 4)
    assert by["layer4.1.relu#2"].stride == (32, 32)
    assert by["layer4.1.relu#2"].receptive_field == (435, 435)  # the known theoretical RF of ResNet-18


def test_hooks_fallback_matches_fx_on_modules(tiny_model):
    x = torch.randn(2, 1, 16, 16)
    fx, hooks = trace_graph(tiny_model, x), trace_graph(tiny_model, x, prefer="hooks")
    assert hooks.method == "hooks"
    shapes = {n.name: n.output_shape for n in fx.nodes}
    for n in hooks.nodes:
        if n.kind == "module":
            assert shapes[n.name] == n.output_shape
    # functional relus between modules show up as 'functional@<consumer>' nodes
    assert any(n.name.startswith("functional@") for n in hooks.nodes)


def test_untraceable_model_falls_back_to_hooks():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.conv(x)
            return self.conv(-x)

    graph = trace_graph(Branchy(), torch.ones(1, 1, 8, 8))
    assert graph.method == "hooks" and graph.fallback_reason
    assert graph.nodes[-1].output_shape == [1, 4, 6, 6]


def test_following_activation(tiny_model):
    m = torchvision.models.resnet18(weights=None)
    act = following_activation(m, ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"])
    assert act == {"conv1": "relu", "layer1.0.conv1": "layer1.0.relu", "layer1.0.conv2": "layer1.0.conv2",
                   "fc": "fc"}
    assert following_activation(tiny_model, ["conv1"]) == {"conv1": "relu"}  # functional torch.relu node
