"""Cost of a model (whole and per layer), the yardstick that prune targets are bisected against.

Totals come from the profiler's `summarize`, so prune's "before/after" agree with the profile
stage; per-layer numbers come from forward hooks on Conv/Linear layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def out_channels(m: nn.Module) -> int | None:
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    return None


@torch.no_grad()
def layer_costs(model: nn.Module, example: torch.Tensor) -> dict[str, dict[str, int]]:
    """{name: {channels, macs, params}} for every Conv/Linear run by one forward (batch of 1)."""
    costs: dict[str, dict[str, int]] = {}
    hooks = []

    def hook(name: str):
        def fn(m, _inp, out):
            if not isinstance(out, torch.Tensor):
                return
            per_out = out[:1].numel()
            if isinstance(m, nn.modules.conv._ConvNd):
                k = 1
                for d in m.kernel_size:
                    k *= d
                macs = per_out * k * (m.out_channels if m.transposed else m.in_channels) // m.groups
                if m.transposed:  # each input pixel scatters in_ch/groups x k into out
                    macs = _inp[0][:1].numel() * k * m.out_channels // m.groups
            else:
                macs = per_out * m.in_features
            c = costs.setdefault(name, {"channels": out_channels(m) or 0, "macs": 0,
                                        "params": sum(p.numel() for p in m.parameters(recurse=False))})
            c["macs"] += int(macs)
        return fn

    for name, m in model.named_modules():
        if isinstance(m, LAYER_TYPES):
            hooks.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return costs


def model_cost(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """{macs, params, liveness_peak_bytes} for a batch of 1, from the profiler's `summarize`, so
    prune's before/after agree with the profile stage."""
    from pipeline.profiling import summarize

    s = summarize(model, example[:1])
    return {"macs": int(s["macs"]), "params": int(s["params"]),
            "liveness_peak_bytes": None if s.get("liveness_peak_bytes") is None else int(s["liveness_peak_bytes"])}
