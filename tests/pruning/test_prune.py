"""Prune stage and engine: criteria rank the right channels, targets are met, names validated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import BadInput
from pipeline.profiling.stats import ChannelStats, LayerStats
from pipeline.pruning.engine import PruneSettings, Protection, default_protection, prune_copy, prune_to_target, resolve_ignored
from pipeline.profiling.stats import collect_channel_stats
from pipeline.pruning.measure import model_cost
from pipeline.stages.prune import PruneConfig, PruneStage


def _stats(model, mean_abs: dict[str, np.ndarray], dead: dict[str, list[int]] | None = None) -> ChannelStats:
    layers = {}
    for name, v in mean_abs.items():
        d = np.zeros(len(v), dtype=bool)
        d[(dead or {}).get(name, [])] = True
        layers[name] = LayerStats(mean_abs=v, apoz=np.zeros(len(v)), variance=np.ones(len(v)), dead=d, samples=8)
    return ChannelStats(layers=layers)


def _protect(*names: str) -> Protection:
    p = Protection()
    for n in names:
        p.add(n, "test")
    return p


def test_dead_channel_is_pruned_first(tiny_model, tiny_data):
    torch.nn.init.constant_(tiny_model.conv3.weight, 0.5)
    with torch.no_grad():
        tiny_model.conv3.weight[5] = 0.0
        tiny_model.conv3.bias[5] = 0.0
    stats = collect_channel_stats(tiny_model, (x for x, _ in tiny_data.calibration.batches()))
    assert stats.layers["conv3"].dead[5]
    pruned = prune_copy(tiny_model, torch.randn(1, 1, 16, 16), 1 / 16, PruneSettings(), _protect("conv1", "fc"), stats)
    assert pruned.conv3.out_channels == 15
    # every remaining row is a live (non-zero) filter: the dead one is gone
    assert (pruned.conv3.weight.flatten(1).abs().sum(1) > 0).all()


def test_activation_ranks_low_mean_first(tiny_model):
    means = np.arange(16, dtype=np.float64) + 1.0  # channel 0 weakest
    means[[3, 9]] = 0.01
    stats = _stats(tiny_model, {"conv3": means})
    ref = tiny_model.conv3.weight.detach().clone()
    pruned = prune_copy(tiny_model, torch.randn(1, 1, 16, 16), 0.125, PruneSettings(), _protect("conv1", "fc"), stats)
    kept = [i for i in range(16) if i not in (3, 9)]
    assert torch.equal(pruned.conv3.weight, ref[kept])


def test_correlation_aware_drops_one_of_a_duplicate_pair(tiny_model):
    means = np.linspace(1.0, 2.0, 16)
    corr = np.eye(16)
    corr[14, 15] = corr[15, 14] = 0.99  # the two strongest channels are duplicates
    st = _stats(tiny_model, {"conv3": means}).layers["conv3"]
    st.corr = corr
    stats = ChannelStats(layers={"conv3": st})
    ref = tiny_model.conv3.weight.detach().clone()
    s = PruneSettings(correlation_aware=True)
    pruned = prune_copy(tiny_model, torch.randn(1, 1, 16, 16), 1 / 16, s, _protect("conv1", "fc"), stats)
    assert torch.equal(pruned.conv3.weight, ref[[*range(14), 15]])  # 14 (weaker twin) removed, not 0


def test_ignore_and_round_to_respected(tiny_model, tiny_data, make_ctx):
    ctx = make_ctx(tiny_model, tiny_data)
    cfg = PruneConfig(criterion="l1", target="ratio", amount=0.4, ignore=["conv1"], round_to=4)
    res = PruneStage().run(ctx, cfg)
    m = ctx.model
    assert m.conv1.out_channels == 8 and m.conv2.out_channels == 8  # conv1's group (residual) kept
    assert m.conv3.out_channels % 4 == 0 and m.conv3.out_channels < 16
    reasons = {r["name"]: r["reason"] for r in res.metrics["left_alone"]}
    assert reasons["conv1"] == "ignored by user"
    assert reasons["fc"].startswith("classifier")
    assert m.fc.out_features == 10


def test_unknown_layer_name_is_bad_input_with_suggestion(tiny_model):
    with pytest.raises(BadInput, match=r"'conv_3'.*conv3"):
        resolve_ignored(tiny_model, ["conv_3"])


def test_macs_target_within_tolerance():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    protect = default_protection(model, x)
    assert protect.reasons == {"fc": "classifier (num_classes outputs)"}
    found = prune_to_target(model, x, "macs", 0.5, PruneSettings(criterion="l2"), protect, tolerance=0.03)
    red = 1 - model_cost(found.model, x)["macs"] / model_cost(model, x)["macs"]
    assert found.reached and abs(red - 0.5) <= 0.03
    assert found.model(x).shape == (1, 10)


def test_stage_end_to_end_with_finetune_and_checkpoint(tiny_model, tiny_data, make_ctx):
    from pipeline.pruning.checkpoint import load_checkpoint

    ctx = make_ctx(tiny_model, tiny_data)
    cfg = PruneConfig.model_validate({"criterion": "activation", "macs": 0.4, "global": True,
                                      "finetune": {"epochs": 2, "lr": 0.01, "patience": 1}})
    assert cfg.global_pruning and cfg.target == "macs"
    res = PruneStage().run(ctx, cfg)
    m = res.metrics
    assert m["reduction"]["macs"] >= 0.4 - 0.02
    assert m["after"]["macs"] < m["before"]["macs"]
    assert set(m["accuracy"]) == {"before", "after_prune", "after_finetune"}
    assert m["accuracy"]["after_finetune"] is not None and 1 <= m["finetune"]["epochs_run"] <= 2
    assert any(r["channels_after"] < r["channels_before"] for r in m["layers"])
    assert res.artifacts["prune_channels"].path.stat().st_size > 0
    assert ctx.original_model.conv3.out_channels == 16  # reference untouched
    import json

    json.dumps(m)  # metrics are JSON-serialisable
    # restore() rebuilds the same model from the checkpoint
    pruned = ctx.model
    PruneStage().restore(ctx, cfg, res)
    x = tiny_data.eval.first_batch()[0]
    assert torch.equal(ctx.model(x), pruned(x))
    assert load_checkpoint(res.artifacts["pruned_checkpoint"].path, type(tiny_model)()).conv3.out_channels \
        == pruned.conv3.out_channels


@pytest.mark.parametrize("criterion", ["apoz", "l2", "taylor", "bn_scale"])
def test_other_criteria_run(criterion, tiny_model, tiny_data, make_ctx):
    ctx = make_ctx(tiny_model, tiny_data)
    res = PruneStage().run(ctx, PruneConfig(criterion=criterion, target="ratio", amount=0.25))
    assert res.metrics["after"]["params"] < res.metrics["before"]["params"]


def test_config_rejects_two_targets():
    with pytest.raises(ValueError):
        PruneConfig.model_validate({"macs": 0.5, "ratio": 0.3})
