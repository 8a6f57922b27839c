"""Targets through onnxruntime: the same numbers as torch, or torch itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.pruning import fast_inference
from pipeline.pruning.fast_inference import forward_all
from tests.pruning.test_depth import Chain, _images


@torch.no_grad()
def _torch_outputs(model: nn.Module, x: torch.Tensor, tap: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    got = []
    h = tap.register_forward_hook(lambda _m, _a, o: got.append(o))
    try:
        out = model.eval()(x)
    finally:
        h.remove()
    return out, got[0]


def test_logits_and_tapped_outputs_match_torch_through_onnxruntime(monkeypatch):
    model, x = Chain().eval(), _images(40)
    tap = model.blocks[1]
    said: list[str] = []
    ran = []
    real = fast_inference._onnxruntime

    def counted(*args):
        run = real(*args)
        return lambda x: ran.append(len(x)) or run(x)

    monkeypatch.setattr(fast_inference, "_onnxruntime", counted)
    out, (feat,) = forward_all(model, x, [tap], batch_size=16, log=said.append)
    want_out, want_feat = _torch_outputs(model, x, tap)
    assert said == [] and ran == [8, 16, 16, 8]  # the check's 8 images, then every batch
    assert out.shape == want_out.shape and feat.shape == want_feat.shape
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feat, want_feat, rtol=1e-4, atol=1e-4)


class _Branchy(nn.Module):
    """Data-dependent control flow: the traced graph keeps only the branch of the export example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if float(x.mean()) > 0 else -self.fc(x)


def test_a_graph_that_differs_from_torch_falls_back_to_torch():
    model = _Branchy().eval()
    x = torch.cat([torch.ones(1, 4), -torch.ones(7, 4)])  # exported on the first, checked on all eight
    said: list[str] = []
    out, taps = forward_all(model, x, batch_size=4, log=said.append)
    assert taps == [] and any("running in torch" in s for s in said), said
    with torch.no_grad():
        want = torch.cat([model(x[:4]), model(x[4:])])
    assert torch.equal(out, want)


def test_a_tap_that_hands_on_a_non_tensor_is_an_error():
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair = Pair()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pair(x)[0]

    net = Net()
    with pytest.raises(TypeError, match="tensor at the tap"):
        forward_all(net, torch.ones(2, 3), [net.pair])


def test_batchnorm_stays_in_eval_mode_and_its_statistics_untouched():
    # the exporter restores the mode of what it exports: a wrapper left in train mode would put the
    # model's BatchNorm in train mode for every later forward (batch statistics, running stats updated)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = _images(12)
    with torch.no_grad():
        want = model(x)
    out, _ = forward_all(model, x, batch_size=4)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert not model.training and not model[1].training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(x), want)
