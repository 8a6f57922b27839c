"""Liveness peak: exact answers on hand-built graphs, and within 5% of the measured allocator peak."""

import pytest
import torch
import torchvision
from torch import nn

from pipeline.profiling.graph import trace_graph
from pipeline.profiling.memory import liveness, measure_peak
from pipeline.profiling.model_profile import profile_model

T = 4 * 8 * 8 * 4  # bytes of one [1, 4, 8, 8] float32 map


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.relu, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return torch.flatten(self.conv2(self.relu(self.conv1(x))), 1)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a = self.conv1(x)
        return torch.relu(self.conv2(a) + a)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(1, 4, 1), nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv3(torch.cat([self.conv1(x), self.conv2(x)], 1))


def _live(model, bs=1):
    return liveness(trace_graph(model.eval(), torch.randn(bs, 1, 8, 8)))


def test_chain_views_and_inplace_are_not_double_counted():
    live = _live(Chain())
    assert live.peak_bytes == 2 * T  # conv1 (relu'd in place) + conv2; flatten is a view
    assert live.peak_at == "conv2" and live.alive_at_peak == ["relu", "conv2"]
    assert live.naive_sum_bytes == 4 * T  # conv1, relu, conv2, flatten: what summing outputs claims
    assert [b for _, b in live.timeline] == [T, T, 2 * T, T]
    assert live.input_bytes == 8 * 8 * 4


def test_residual_keeps_the_skip_alive():
    live = _live(Residual())
    assert live.peak_bytes == 3 * T and live.peak_at == "add"
    assert live.alive_at_peak == ["conv1", "conv2", "add"]
    assert [b for _, b in live.timeline] == [T, 2 * T, 3 * T, 2 * T]


def test_concat_holds_inputs_and_output():
    live = _live(Concat())
    assert live.peak_bytes == 4 * T and live.peak_at == "cat"
    assert [b for _, b in live.timeline] == [T, 2 * T, 4 * T, 3 * T]


def test_batch_size_scales_and_per_sample_is_reported():
    model = Residual().eval()
    one = profile_model(model, torch.randn(1, 1, 8, 8), measure=False)["memory"]
    four = profile_model(model, torch.randn(1, 1, 8, 8), batch_size=4, measure=False)["memory"]
    assert four["batch_size"] == 4 and four["liveness_peak_bytes"] == 4 * one["liveness_peak_bytes"]
    assert four["liveness_peak_per_sample_bytes"] == one["liveness_peak_bytes"] == 3 * T


def _within_5pct(model, x):
    est = liveness(trace_graph(model, x)).peak_bytes
    measured = measure_peak(model, x)
    assert measured.with_scratch_bytes >= measured.peak_bytes > 0
    assert abs(est - measured.peak_bytes) <= 0.05 * measured.peak_bytes, (est, measured)
    return est, measured


def test_small_cnn_estimate_matches_measured(tiny_model):
    _within_5pct(tiny_model, torch.randn(1, 1, 32, 32))
    _within_5pct(tiny_model, torch.randn(8, 1, 32, 32))


def test_resnet18_estimate_matches_measured():
    model = torchvision.models.resnet18(weights=None).eval()
    est, measured = _within_5pct(model, torch.randn(1, 3, 224, 224))
    naive = liveness(trace_graph(model, torch.randn(1, 3, 224, 224))).naive_sum_bytes
    assert naive > 4 * est  # why summing every layer's output misleads


@pytest.mark.slow
def test_mobilenet_v2_estimate_matches_measured():
    _within_5pct(torchvision.models.mobilenet_v2(weights=None).eval(), torch.randn(1, 3, 224, 224))
