"""Depth pruning (whole residual blocks dropped) and block-wise distillation."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from pipeline.errors import BadInput
from pipeline.pruning.blockwise import BlockwiseSettings, distill_blocks
from pipeline.pruning.checkpoint import load_checkpoint, save_checkpoint
from pipeline.pruning.depth import Bypass, block_candidates, drop_blocks, layers_after, select_blocks
from pipeline.pruning.measure import model_cost
from pipeline.pruning.reconstruct import reconstruct
from pipeline.sources.data import DataBundle, TensorSplit
from pipeline.stages.prune import PruneConfig, PruneStage


class Residual(nn.Module):
    """x + f(x); `scale` sets how much the block matters; takes an extra argument like EfficientNet's."""

    def __init__(self, c: int, scale: float) -> None:
        super().__init__()
        self.expand, self.project = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, c, 1)
        with torch.no_grad():
            self.project.weight.mul_(scale)

    def forward(self, x: torch.Tensor, drop_connect_rate: float | None = None) -> torch.Tensor:
        return x + self.project(torch.relu(self.expand(x)))


class Down(nn.Module):
    """Changes the shape: never a candidate."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class Chain(nn.Module):
    """stem -> blocks (EfficientNet-style ModuleList, called with an extra argument) -> head -> fc."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([Residual(8, 4.0), Residual(8, 0.01), Down(8), Residual(16, 4.0),
                                     Residual(16, 0.01)])
        self.head = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for b in self.blocks:
            x = b(x, drop_connect_rate=None) if isinstance(b, (Residual, Bypass)) else b(x)
        return self.fc(torch.relu(self.head(x)).mean((2, 3)))


def _images(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Noise plus a per-image colour, so that the pooled features (and decisions) differ between images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g) + 3 * torch.randn(n, 3, 1, 1, generator=g)


def test_candidates_are_the_outermost_same_shape_blocks_of_a_chain():
    model = Chain().eval()
    assert block_candidates(model, _images(1)) == ["blocks.0", "blocks.1", "blocks.3", "blocks.4"]
    tv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
                       nn.Flatten(), nn.Linear(4 * 16 * 16, 10))
    # the inner Sequential is a candidate; its own conv child is nested in it, so it is not offered
    assert block_candidates(tv, _images(1)) == ["1"]


def test_greedy_drops_the_blocks_that_matter_least_until_the_target():
    model = Chain().eval()
    ex, x = _images(1), _images(64)
    base = model_cost(model, ex)["macs"]
    one_block = 1 - model_cost(drop_blocks(copy.deepcopy(model), ["blocks.4"]), ex)["macs"] / base
    found = select_blocks(model, ex, "macs", one_block, 0.005, x)
    weak = found.dropped[0]
    assert found.reached and found.dropped == [weak] and weak in ("blocks.1", "blocks.4")  # same MACs each
    i = int(weak[-1])
    assert isinstance(found.model.blocks[i], Bypass) and not isinstance(model.blocks[i], Bypass)  # a copy
    assert found.trials[0]["agreement"] > 0.9
    strong = drop_blocks(copy.deepcopy(model), ["blocks.3"])
    assert float((strong(x).argmax(1) == model(x).argmax(1)).float().mean()) < found.trials[0]["agreement"]
    more = select_blocks(model, ex, "macs", 0.99, 0.005, x, protected={"blocks.1"})
    assert not more.reached and "blocks.1" not in more.dropped and len(more.dropped) == 3


def test_dropped_blocks_survive_checkpoint_and_onnx_export(tmp_path):
    model = drop_blocks(Chain().eval(), ["blocks.1", "blocks.4"])
    x = _images(4)
    path = save_checkpoint(tmp_path / "p.pt", model, base_source={}, history={})
    loaded = load_checkpoint(path, Chain().eval())
    assert isinstance(loaded.blocks[1], Bypass) and isinstance(loaded.blocks[4], Bypass)
    assert torch.equal(loaded(x), model(x))
    buf = io.BytesIO()
    torch.onnx.export(loaded, (x[:1],), buf, opset_version=17, dynamo=False)
    assert buf.getvalue()
    obj = torch.load(path, weights_only=True)
    obj["dropped"] = ["blocks.9"]
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(BadInput, match="blocks.9"):
        load_checkpoint(tmp_path / "bad.pt", Chain().eval())


def test_refit_of_named_layers_after_a_dropped_block_brings_the_logits_back():
    teacher = Chain().eval()
    student = drop_blocks(copy.deepcopy(teacher), ["blocks.3"])
    x, held = _images(128), _images(64, seed=1)
    names = layers_after(student, x[:1], "blocks.3")
    assert names == ["blocks.4", "blocks.4.expand", "blocks.4.project", "head", "fc"]
    err = lambda: float(((student(held) - teacher(held)) ** 2).mean().detach())  # noqa: E731
    before = err()
    done = reconstruct(student, teacher, x, {}, names=names)
    assert done == ["blocks.4.expand", "blocks.4.project", "head", "fc"]
    assert err() < 0.7 * before


def test_blockwise_trains_the_neighbours_of_a_dropped_block_together_and_leaves_unchanged_blocks():
    teacher = Chain().eval()
    student = drop_blocks(copy.deepcopy(teacher), ["blocks.4"])
    with torch.no_grad():
        student.blocks[2].conv.weight.mul_(0.5)  # damage a block before the gap's unit
    x = _images(64)
    untouched = copy.deepcopy(student.blocks[0].state_dict())
    info = distill_blocks(student, teacher, "blocks", x, BlockwiseSettings(epochs=20, lr=1e-2, batch_size=16))
    status = {r["block"]: r["status"] for r in info["blocks"]}
    assert status == {"blocks.0": "unchanged", "blocks.1": "unchanged", "blocks.2": "trained",
                      "blocks.3..4": "trained"}
    assert next(r for r in info["blocks"] if r["block"] == "blocks.3..4")["members"] == ["blocks.3", "blocks.4"]
    assert all(torch.equal(v, student.blocks[0].state_dict()[k]) for k, v in untouched.items())
    assert all(r["error_after"] < 0.5 * r["error_before"] for r in info["blocks"] if r["status"] == "trained")
    # trained in channels-last layout, handed back in the default one (what export and checkpoints expect)
    assert all(p.is_contiguous() for p in student.parameters())


def test_blockwise_unit_whose_training_raises_its_error_keeps_its_weights():
    """Too high an lr: the unit comes out worse than it went in; it is reverted, so neither the
    returned model nor the units after it inherit the damage."""
    teacher = Chain().eval()
    student = drop_blocks(copy.deepcopy(teacher), ["blocks.4"])
    x = _images(32)
    before = copy.deepcopy(student.state_dict())
    info = distill_blocks(student, teacher, "blocks", x, BlockwiseSettings(epochs=2, lr=50.0, batch_size=16))
    row = next(r for r in info["blocks"] if r["block"] == "blocks.3..4")
    # diverged (null: not finite) or merely worse
    assert row["status"].startswith("reverted") and not (row["error_after"] or float("inf")) < row["error_before"]
    assert info["trained"] == 0
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_blockwise_in_channels_last_layout_learns_what_the_default_layout_learns():
    """The layout is a speed choice only: the same steps give the same model up to float rounding
    (compared as functions: Adam can turn a rounding difference in a near-zero gradient into a
    visible one in a single weight, on any CPU's kernels)."""
    from pipeline.pruning import blockwise

    teacher = Chain().eval()
    x = _images(32)
    outputs, errors = [], []
    for layout in (blockwise._channels_last, _default_layout):
        student = drop_blocks(copy.deepcopy(teacher), ["blocks.4"])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(blockwise, "_channels_last", layout)
            info = distill_blocks(student, teacher, "blocks", x, BlockwiseSettings(epochs=4, lr=1e-2, batch_size=16))
        errors.append([(r["error_before"], r["error_after"]) for r in info["blocks"] if r["status"] == "trained"])
        with torch.no_grad():
            outputs.append(student.eval()(x))
    assert errors[0] and all(after < before for before, after in errors[0])  # it trained
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-3, atol=1e-3 * float(outputs[1].abs().max()))
    for (b0, a0), (b1, a1) in zip(errors[0], errors[1], strict=True):
        assert b0 == pytest.approx(b1, rel=1e-3) and a0 == pytest.approx(a1, rel=1e-2)


@contextlib.contextmanager
def _default_layout(block, x):
    yield lambda t: t


@pytest.mark.parametrize(("dropped", "expected"), [
    ([], [[0], [1], [2], [3]]),
    ([1], [[0, 1, 2], [3]]),
    ([0], [[0, 1], [2], [3]]),
    ([3], [[0], [1], [2, 3]]),
    ([1, 3], [[0, 1, 2, 3]]),
    ([1, 2], [[0, 1, 2, 3]]),
])
def test_units_join_each_gap_with_its_kept_neighbours(dropped, expected):
    from pipeline.pruning.blockwise import units

    blocks = [Bypass() if i in dropped else nn.Conv2d(2, 2, 1) for i in range(4)]
    assert units(blocks) == expected


def test_blockwise_skips_a_container_whose_blocks_do_not_feed_each_other():
    class Parallel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branches = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.branches[0](x) + self.branches[1](x)

    m = Parallel().eval()
    info = distill_blocks(copy.deepcopy(m), m, "branches", _images(8), BlockwiseSettings(epochs=1))
    assert info["blocks"] == [] and "do not feed" in info["skipped"]


def _ctx(make_ctx, n: int = 192):
    x = _images(n, seed=3)
    split = TensorSplit("u", x, None, batch_size=32)
    return make_ctx(Chain().eval(), DataBundle(calibration=split, eval=split, train=split))


def test_stage_with_structure_blocks_reports_dropped_blocks_and_blockwise(make_ctx, tmp_path):
    ctx = _ctx(make_ctx)
    cfg = PruneConfig.model_validate({"structure": "blocks", "macs": 0.15, "blockwise": {"epochs": 4, "lr": 0.01}})
    result = PruneStage().run(ctx, cfg)
    m = result.metrics
    assert m["structure"] == "blocks" and m["dropped_blocks"] and m["ratio"] is None
    assert m["reduction"]["macs"] >= 0.13 and m["target_reached"]
    assert m["search"][0]["block"] == m["dropped_blocks"][0]
    assert m["reconstruct"]["layers"]  # the layers behind the first dropped block were refitted
    bw = m["blockwise"]
    assert bw["chain"] == "blocks" and bw["source"] == "data.train" and bw["images"] == 192
    assert bw["decided_on"]["agreement_with"] >= bw["decided_on"]["agreement_without"] or not bw["applied"]
    assert 0 <= m["agreement"]["after_blockwise"] <= 1
    head = bw["head"]  # on by default: the layers after the chain distilled against the logits
    assert head["status"] in ("trained", "reverted (training raised the KL divergence)")
    assert head["images"] == 192 and head["views"] == 0 and head["kl_before"] >= 0
    reloaded = load_checkpoint(result.artifacts["pruned_checkpoint"].path, Chain().eval())
    x = _images(2)
    assert torch.allclose(reloaded(x), ctx.model(x))


@pytest.mark.parametrize("extra", [{"global": True}, {"allocation": "sensitivity"}, {"rounds": 2},
                                   {"compare_allocations": True}])
def test_channel_only_options_are_rejected_with_blocks(extra):
    with pytest.raises(ValidationError, match="structure 'channels' only"):
        PruneConfig.model_validate({"structure": "blocks", "macs": 0.3, **extra})


def test_blocks_on_a_model_without_blocks_is_bad_input(make_ctx):
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)).eval()
    split = TensorSplit("u", _images(32), None, batch_size=16)
    ctx = make_ctx(flat, DataBundle(calibration=split, eval=split))
    with pytest.raises(BadInput, match="no droppable block"):
        PruneStage().run(ctx, PruneConfig.model_validate({"structure": "blocks", "macs": 0.3}))


class _Clock:
    """A wall clock that moves 10 ms each time it is read: time budgets become step counts."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 0.01
        return self.now


def test_adam_cosine_ends_at_its_seconds_or_its_steps_whichever_comes_first(monkeypatch):
    from pipeline.pruning import blockwise

    monkeypatch.setattr(blockwise.time, "monotonic", _Clock())
    w = nn.Parameter(torch.ones(4))
    lrs: list[float] = []

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        return (w ** 2).sum()

    real_step = torch.optim.Adam.step

    def spy(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    assert blockwise.adam_cosine([w], 64, 7, 16, 0.1, 0, loss_of, lambda m: None) == 7
    lrs.clear()
    taken = blockwise.adam_cosine([w], 64, 10**6, 16, 0.1, 0, loss_of, lambda m: None, seconds=1.0)
    assert 5 < taken < 100 and len(lrs) == taken  # the clock, not the million steps, ended it
    assert lrs[0] == pytest.approx(0.1, rel=0.01) and lrs[-1] < 0.01 and lrs == sorted(lrs, reverse=True)  # a full cosine
    assert blockwise.adam_cosine([w], 64, 10**6, 16, 0.1, 0, loss_of, lambda m: None, seconds=0.0) == 1


def test_blockwise_minutes_are_shared_equally_by_the_units_that_train(monkeypatch):
    """blocks.0 and blocks.1 are unchanged (no time), blocks.2 and the gap's unit split the budget;
    the epochs (4,000 steps per unit) never end one."""
    from pipeline.pruning import blockwise

    clock = _Clock()
    monkeypatch.setattr(blockwise.time, "monotonic", clock)
    teacher = Chain().eval()
    student = drop_blocks(copy.deepcopy(teacher), ["blocks.4"])
    with torch.no_grad():
        student.blocks[2].conv.weight.mul_(0.5)
    start = clock.now
    info = distill_blocks(student, teacher, "blocks", _images(32),
                          BlockwiseSettings(epochs=2000, lr=1e-2, batch_size=16, minutes=0.1))
    rows = {r["block"]: r for r in info["blocks"]}
    assert [rows[b]["status"] for b in ("blocks.0", "blocks.1")] == ["unchanged", "unchanged"]
    a, b = rows["blocks.2"], rows["blocks.3..4"]
    assert a["status"] == b["status"] == "trained" and info["minutes"] == 0.1
    assert 2.0 < a["seconds"] < 3.5 and 2.0 < b["seconds"] < 3.5, (a, b)  # about half of 6 s each
    assert 0 < a["steps"] < 1000 and b["error_after"] < b["error_before"]
    assert clock.now - start < 7.0
