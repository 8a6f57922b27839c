"""Head distillation: the layers after the residual chain trained against the original's logits."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from pipeline.pruning.head import HeadSettings, chain_output, distill_head
from tests.pruning.test_depth import Chain, _images


def _perturbed_head(teacher: nn.Module, scale: float = 0.5) -> nn.Module:
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in list(student.head.parameters()) + list(student.fc.parameters()):
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return student


def _agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x).argmax(1) == b(x).argmax(1)).float().mean())


def test_head_learns_the_original_decisions_and_leaves_the_chain_alone():
    teacher = Chain().eval()
    student = _perturbed_head(teacher)
    x, held = _images(256), _images(128, seed=1)
    chain_before = copy.deepcopy(student.blocks.state_dict())
    before = _agreement(student, teacher, held)
    info = distill_head(student, teacher, "blocks", x, HeadSettings(epochs=30, lr=3e-3))
    assert info["status"] == "trained" and info["kl_after"] < 0.5 * info["kl_before"]
    assert _agreement(student, teacher, held) > before + 0.1
    after = student.blocks.state_dict()
    assert all(torch.equal(after[k], v) for k, v in chain_before.items())
    # the chain's blocks are the model's own again, and the model runs as before
    assert all(type(b).__name__ != "_Cached" for b in student.blocks)
    assert torch.equal(chain_output(student, "blocks", x[:4]), chain_output(teacher, "blocks", x[:4]))


def test_head_that_uses_more_than_the_chain_output_is_left_untouched():
    class Skip(Chain):
        """Also pools the output of a block inside the chain (like a feature pyramid)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, taps = torch.relu(self.stem(x)), []
            for b in self.blocks:
                y = b(y) if isinstance(b, type(self.blocks[2])) else b(y, drop_connect_rate=None)
                taps.append(y.mean())
            return self.fc(torch.relu(self.head(y)).mean((2, 3))) + taps[2]

    teacher = Skip().eval()
    student = _perturbed_head(teacher)
    state = copy.deepcopy(student.state_dict())
    info = distill_head(student, teacher, "blocks", _images(32), HeadSettings(epochs=2))
    assert "more than its output" in info["skipped"]
    assert all(torch.equal(student.state_dict()[k], v) for k, v in state.items())


def test_head_training_that_raises_the_divergence_is_reverted():
    teacher = Chain().eval()
    student = _perturbed_head(teacher, 0.05)
    state = copy.deepcopy(student.state_dict())
    info = distill_head(student, teacher, "blocks", _images(64), HeadSettings(epochs=3, lr=50.0))
    assert info["status"].startswith("reverted")
    assert all(torch.equal(student.state_dict()[k], v) for k, v in state.items())


def test_head_is_topped_up_with_augmented_views_when_the_split_is_small(make_ctx):
    from pipeline.stages.prune import PruneConfig, PruneStage
    from tests.pruning.test_depth import _ctx

    cfg = PruneConfig.model_validate({"structure": "blocks", "macs": 0.15, "blockwise": {
        "epochs": 1, "head": {"epochs": 1, "images": 300, "augment": {"crop_scale": [0.5, 1.0]}}}})
    head = PruneStage().run(_ctx(make_ctx), cfg).metrics["blockwise"]["head"]
    assert head["images"] == 300 and head["views"] == 300 - 192
    with pytest.raises(ValidationError, match="head.nope"):
        PruneConfig.model_validate({"structure": "blocks", "blockwise": {"head": {"nope": 1}}})


def _stem_sizes(student: nn.Module, teacher: nn.Module) -> tuple[dict, set[tuple[int, int]]]:
    sizes: set[tuple[int, int]] = set()
    h = student.stem.register_forward_pre_hook(lambda _m, a: sizes.add(tuple(int(v) for v in a[0].shape[-2:])))
    try:
        info = distill_head(student, teacher, "blocks", _images(64), HeadSettings(epochs=4, lr=3e-3))
    finally:
        h.remove()
    return info, sizes


def test_the_replaced_model_is_fed_a_corner_of_each_image_unless_it_needs_the_whole():
    teacher = Chain().eval()
    info, sizes = _stem_sizes(_perturbed_head(teacher), teacher)
    assert info["status"] == "trained" and (8, 8) in sizes  # the stem's work on full images is wasted

    class SizeBound(Chain):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if tuple(x.shape[-2:]) != (16, 16):
                raise ValueError("expects 16x16 images")
            return super().forward(x)

    teacher = SizeBound().eval()
    info, sizes = _stem_sizes(_perturbed_head(teacher), teacher)
    assert info["status"] == "trained" and info["kl_after"] < info["kl_before"] and sizes == {(16, 16)}


def test_head_minutes_end_training_before_its_epochs(monkeypatch):
    """A budget of 0.05 minutes on a clock that moves 10 ms per reading: a few dozen steps instead
    of the epochs' 4,000, still trained, and the steps reported are the ones taken."""
    from pipeline.pruning import blockwise, head
    from tests.pruning.test_depth import _Clock

    clock = _Clock()
    monkeypatch.setattr(blockwise.time, "monotonic", clock)
    monkeypatch.setattr(head.time, "monotonic", clock)
    teacher = Chain().eval()
    student = _perturbed_head(teacher)
    start = clock.now
    info = distill_head(student, teacher, "blocks", _images(64), HeadSettings(epochs=4000, lr=3e-3, minutes=0.05))
    assert info["status"] == "trained" and info["minutes"] == 0.05
    assert 1 <= info["steps"] < 200 and info["kl_after"] < info["kl_before"]
    assert clock.now - start < 4.0  # 3 s of budget, a few readings after it
