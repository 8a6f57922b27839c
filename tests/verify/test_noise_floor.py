"""The agreement noise floor: the original's agreement with itself under one grey level of noise."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from pipeline.report.document import build_report
from pipeline.report.html import render_html
from pipeline.report.markdown import render_markdown
from pipeline.sources.data import DataBundle, TensorSplit
from pipeline.stages import get_stage
from pipeline.stages.verify import VerifyConfig
from pipeline.verify.noise_floor import grey_level, with_grey_noise

FAST = {"batch_sizes": [1], "warmup": 1, "iterations": 5}


class SignOfMean(nn.Module):
    """Classes 0/1 decided by the sign of the image's mean (a mean near 0 is a near-tie); class 2 never
    wins, it keeps ties below 0.5 probability, i.e. not confident."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, -m, torch.zeros_like(m)], 1)


def _images(tied: int, clear: int) -> torch.Tensor:
    """`tied` images with mean exactly 0 (any noise decides them), `clear` ones with mean +-1."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(tied + clear, 3, 16, 16, generator=g) * 2 - 1
    x[:tied] -= x[:tied].mean(dim=(1, 2, 3), keepdim=True)
    x[tied:] = x[tied:].clamp(-0.2, 0.2) + torch.where(torch.arange(clear) % 2 == 0, 1.0, -1.0).view(-1, 1, 1, 1)
    return x


def _verify(make_ctx, model: nn.Module, x: torch.Tensor, **cfg):
    ctx = make_ctx(model, DataBundle(eval=TensorSplit("eval", x, None, batch_size=16)))
    return get_stage("verify")().run(ctx, VerifyConfig(backends=["torch"], latency=FAST, **cfg))


def test_grey_level_is_one_8bit_step_of_each_channels_range():
    x = np.zeros((2, 2, 4, 4), np.float32)
    x[0, 0], x[1, 0] = -1.0, 1.0  # channel 0 spans [-1, 1]: images scaled to [-1, 1]
    x[0, 1], x[1, 1] = -0.5 / 0.25, 0.5 / 0.25  # channel 1 spans 1/std with std 0.25
    np.testing.assert_allclose(grey_level(x).ravel(), [2 / 255, 1 / 255 / 0.25], rtol=1e-6)
    assert grey_level(np.ones((2, 8), np.float32)) is None  # not an image batch
    assert grey_level(np.ones((2, 3, 4, 4), np.float32)) is None  # no range to take a step of
    noisy = with_grey_noise(np.repeat(x, 500, axis=0), np.random.default_rng(0))
    np.testing.assert_allclose((noisy - np.repeat(x, 500, axis=0)).std(axis=(0, 2, 3)),
                               grey_level(x).ravel(), rtol=0.05)


def test_noise_floor_is_below_one_exactly_where_inputs_sit_on_a_tie(make_ctx):
    tied = _verify(make_ctx, SignOfMean(), _images(tied=32, clear=32)).metrics["noise_floor"]
    assert tied["samples"] == 64
    assert 0.55 <= tied["agreement"] <= 0.95  # about half of the 32 ties flip, none of the 32 clear ones
    assert tied["confident_samples"] == 32 and tied["agreement_confident"] == 1.0
    clear = _verify(make_ctx, SignOfMean(), _images(tied=0, clear=32)).metrics["noise_floor"]
    assert clear["agreement"] == 1.0


def test_no_floor_for_inputs_that_are_not_images(make_ctx):
    torch.manual_seed(0)
    res = _verify(make_ctx, nn.Linear(8, 3).eval(), torch.randn(16, 8))
    assert res.metrics["noise_floor"] is None
    assert res.metrics["results"][0]["accuracy"]["agreement"] == 1.0


def test_agreement_gate_above_the_floor_is_warned_about_and_the_floor_reaches_the_reports(make_ctx, capsys):
    res = _verify(make_ctx, SignOfMean(), _images(tied=32, clear=32), gates={"min_agreement": 0.99})
    err = capsys.readouterr().err
    assert "gates.min_agreement 0.99 is above the noise floor" in " ".join(err.split())
    floor = res.metrics["noise_floor"]
    manifest = {"status": "ok", "exit_code": 0, "stages": [
        {"id": "verify", "kind": "verify", "status": "ok", "metrics": json.loads(json.dumps(res.metrics)),
         "gates": [g.to_dict() for g in res.gates]}]}
    report = build_report(manifest)
    line = f"keeps its top-1 on {100 * floor['agreement']:.2f}% of 64 samples"
    assert line in render_markdown(report)
    assert 'id="noise-floor"' in render_html(report) and line in render_html(report)
    _verify(make_ctx, SignOfMean(), _images(tied=0, clear=32), gates={"min_agreement": 0.99})
    assert "noise floor" not in capsys.readouterr().err
