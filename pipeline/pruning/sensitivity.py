"""Sensitivity-driven per-layer ratios: prune where it hurts the teacher's decisions least.

Uniform ratios treat every layer alike, and torch-pruning's global ranking compares raw weight
norms across layers of different scales; on compact pretrained networks both remove channels some
layers cannot spare. Here each prunable group (torch-pruning DepGraph, coupled layers together)
is probed alone: its `probe` fraction of lowest-ranked channels is *masked* (the weights and
BatchNorm affine of every out-channel member zeroed, which is what removing them does to every
consumer), and the damage is measured on calibration images as KL / agreement / SQNR against the
unmasked model. No surgery per probe, one graph build in all.

Damage per MAC saved becomes a weight per group (less damage -> larger share of the ratio); the
prune search then bisects one scalar ratio with per-group ratios `ratio * weight` (torch-pruning
`pruning_ratio_dict`), so `round_to`, protection and the MAC target work unchanged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.pruning.guards import guarded_trace
from pipeline.pruning.measure import LAYER_TYPES, layer_costs
from pipeline.pruning.validation import logits

MAX_WEIGHT = 3.0  # a group gets at most 3x the mean ratio


def measure_sensitivity(model: nn.Module, example: torch.Tensor, images: torch.Tensor,
                        make_importance: Callable[[nn.Module], Any], ignored: list[str], probe: float = 0.3,
                        round_to: int | None = None) -> list[dict[str, Any]]:
    """One row per prunable group: {layer, channels, probe_channels, kl, agreement, sqnr_db, macs_saved}.

    `make_importance(model)` builds the ranking for the copy probed here (the same criterion the
    prune uses), so the masked channels are the ones pruning would remove first.
    """
    import torch_pruning as tp

    work = copy.deepcopy(model).eval()
    importance = make_importance(work)
    names = {m: n for n, m in work.named_modules()}
    modules = dict(work.named_modules())
    reference = logits(work, images)
    costs = layer_costs(work, example[:1])
    with guarded_trace(work) as customized:
        graph = tp.DependencyGraph().build_dependency(work, example_inputs=example[:1],
                                                      customized_pruners=customized or None)
    with torch.no_grad():
        return _probe_groups(work, graph, importance, names, costs, reference, images,
                             [modules[n] for n in ignored if n in modules], probe, round_to)


def _probe_groups(work: nn.Module, graph: Any, importance: Any, names: dict[nn.Module, str],
                  costs: dict[str, dict[str, int]], reference: torch.Tensor, images: torch.Tensor,
                  skip: list[nn.Module], probe: float, round_to: int | None) -> list[dict[str, Any]]:
    import torch_pruning as tp

    fn = tp.pruner.function
    out_handlers = (fn.prune_conv_out_channels, fn.prune_linear_out_channels)
    bn_handlers = (fn.prune_batchnorm_out_channels,)
    in_handlers = (fn.prune_conv_in_channels, fn.prune_linear_in_channels)
    rows: list[dict[str, Any]] = []
    for group in graph.get_all_groups(ignored_layers=skip, root_module_types=[nn.Conv2d, nn.Linear]):
        root = group[0].dep.target.module
        name = names.get(root)
        if name is None or not isinstance(root, LAYER_TYPES):
            continue
        width = len(group[0].idxs)
        keep = width - int(width * probe)
        if round_to:
            keep = max(round_to, int(math.ceil(keep / round_to)) * round_to)
        k = width - keep
        if k <= 0:
            continue
        scores = importance(group)
        if scores is None:
            continue
        chosen = sorted(torch.argsort(scores)[:k].tolist())
        handler = group[0].dep.handler
        sub = graph.get_pruning_group(root, handler, idxs=chosen)
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        macs_saved = 0.0
        for dep, idxs in sub:
            m, idx = dep.target.module, list(idxs)
            if dep.handler in out_handlers + bn_handlers:
                for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                    if isinstance(p, torch.Tensor) and p.dim() >= 1 and p.shape[0] > max(idx, default=-1):
                        saved.append((p, p.data.clone()))
                        p.data[idx] = 0
            macs_saved += _macs_removed(m, dep.handler in out_handlers, dep.handler in in_handlers,
                                        len(idx), costs.get(names.get(m, ""), {}).get("macs", 0))
        out = logits(work, images)
        for p, data in saved:
            p.data.copy_(data)
        rows.append({"layer": name, "channels": width, "probe_channels": k, **_damage(reference, out),
                     "macs_saved": int(macs_saved)})
    return rows


def _macs_removed(m: nn.Module, is_out: bool, is_in: bool, removed: int, macs: int) -> float:
    """MACs a Conv/Linear loses when `removed` of its output (or, ungrouped, input) channels go."""
    if not macs or not (is_out or is_in):
        return 0.0
    if is_out:
        width = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
    elif getattr(m, "groups", 1) == 1:
        width = m.in_channels if isinstance(m, nn.modules.conv._ConvNd) else m.in_features
    else:
        return 0.0  # grouped/depthwise: its out-channel entry already counted the loss
    return macs * removed / max(width, 1)


def _damage(reference: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    import torch.nn.functional as F

    kl = float(F.kl_div(F.log_softmax(out, 1), F.log_softmax(reference, 1), log_target=True,
                        reduction="batchmean"))
    agreement = float((out.argmax(1) == reference.argmax(1)).float().mean())
    noise = (out - reference).pow(2).mean().clamp_min(1e-12)
    sqnr = float(10 * torch.log10(reference.pow(2).mean().clamp_min(1e-12) / noise))
    return {"kl": round(kl, 6), "agreement": round(agreement, 4), "sqnr_db": round(sqnr, 2)}


def allocation_weights(rows: list[dict[str, Any]]) -> dict[str, float]:
    """layer -> ratio multiplier: inverse square root of KL per MAC saved, normalised to mean 1."""
    cost = {r["layer"]: max(r["kl"], 1e-6) / max(r["macs_saved"], 1) for r in rows}
    if not cost:
        return {}
    inv = {k: (1.0 / v) ** 0.5 for k, v in cost.items()}
    mean = sum(inv.values()) / len(inv)
    return {k: round(min(MAX_WEIGHT, v / mean), 4) for k, v in inv.items()}
