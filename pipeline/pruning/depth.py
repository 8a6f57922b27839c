"""Depth pruning: remove whole residual blocks, chosen by how little the model's decisions change.

Channel pruning a compact pretrained network (EfficientNet-Lite0) takes a few channels from every
layer, and the damage is spread over all of them: -30% MACs left 68% top-1 agreement with the
original after the best linear refit. Dropping whole blocks of a residual chain instead leaves every
other layer intact: the skip connection still carries the features, and the layers after the gap
can be refitted to the original's outputs. At the same MAC reduction that reaches 70.3% after the
same refit and 77.6% after block-wise distillation (benchmarks/RESULTS.md), and the model runs fewer
kernels.

A block is a child of an nn.Sequential / nn.ModuleList that holds a Conv/Linear, runs once per
forward, and maps a tensor to a tensor of the same shape (so the identity can stand in for it).
Nested candidates give way to the outermost one. Blocks are dropped greedily: at each step the
candidate whose removal moves the output distribution least (KL divergence from the original's on
held-out images; ties: the larger saving) goes, until the cost target is met. KL rather than top-1
agreement: on 64 images agreement moves in steps of 1.6% and ties often; judged by it, Lite0 lost an
early 56x56 block and ended at 74.0% instead of 77.6% after the same recovery, with 768 s of
block-wise training instead of 440 s (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.pruning.measure import LAYER_TYPES, model_cost


class Bypass(nn.Module):
    """Stands in for a dropped block: returns its first input unchanged (extra arguments ignored,
    e.g. EfficientNet's `drop_connect_rate`)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


def drop_blocks(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace each named block of `model` (in place) by a Bypass; returns the model."""
    for name in names:
        model.set_submodule(name, Bypass(), strict=True)
    return model


@torch.no_grad()
def block_candidates(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the blocks that could be dropped (see the module docstring), in execution order."""
    parents = {n for n, m in model.named_modules() if isinstance(m, (nn.Sequential, nn.ModuleList))}
    mods = {n: m for n, m in model.named_modules()
            if n and n.rpartition(".")[0] in parents and n.rpartition(".")[2].isdigit()
            and not isinstance(m, (Bypass, *LAYER_TYPES)) and any(isinstance(c, LAYER_TYPES) for c in m.modules())}
    calls: dict[str, int] = {}
    same_shape: dict[str, bool] = {}
    order: list[str] = []

    def hook(name: str) -> Any:
        def fn(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if name not in order:
                order.append(name)
            x = args[0] if args else None
            same_shape[name] = (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)
                                and x.shape == out.shape and x.dtype == out.dtype)
        return fn

    hooks = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    was_training = model.training
    try:
        model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    ok = [n for n in order if calls.get(n) == 1 and same_shape.get(n)]
    return [n for n in ok if not any(n.startswith(o + ".") for o in ok if o != n)]


@dataclass
class DepthResult:
    model: nn.Module
    dropped: list[str]
    reduction: float
    reached: bool
    trials: list[dict[str, Any]] = field(default_factory=list)  # one row per greedy step


@torch.no_grad()
def select_blocks(model: nn.Module, example: torch.Tensor, cost_key: str, amount: float, tolerance: float,
                  images: torch.Tensor, protected: Collection[str] = (),
                  on_step: Callable[[dict[str, Any]], None] | None = None) -> DepthResult:
    """Drop blocks of a copy of `model` greedily until `cost_key` falls by `amount` (- tolerance).

    Each step tries every remaining candidate on top of those already dropped and drops the one whose
    model's output distribution on `images` is closest (KL) to `model`'s (label-free). Stops when no
    candidate is left (the target is then reported as not reached).
    """
    import torch.nn.functional as F

    from pipeline.pruning.validation import logits

    work = copy.deepcopy(model).eval()
    base = model_cost(work, example)[cost_key]
    reference = F.log_softmax(logits(work, images), 1)
    left = [n for n in block_candidates(work, example) if not any(n == p or n.startswith(p + ".") for p in protected)]
    dropped: list[str] = []
    trials: list[dict[str, Any]] = []
    reduction = 0.0
    while reduction < amount - tolerance and left:
        best: tuple[float, float, str, float] | None = None
        for name in left:
            original = work.get_submodule(name)
            work.set_submodule(name, Bypass(), strict=True)
            try:
                red = 1.0 - model_cost(work, example)[cost_key] / base
                out = F.log_softmax(logits(work, images), 1)
            finally:
                work.set_submodule(name, original, strict=True)
            kl = float(F.kl_div(out, reference, log_target=True, reduction="batchmean"))
            agree = float((out.argmax(1) == reference.argmax(1)).float().mean())
            if best is None or (-kl, red) > (-best[0], best[1]):
                best = (kl, red, name, agree)
        assert best is not None
        kl, reduction, name, agree = best
        drop_blocks(work, [name])
        left.remove(name)
        dropped.append(name)
        row = {"block": name, "reduction": round(reduction, 4), "kl": round(kl, 6), "agreement": round(agree, 4)}
        trials.append(row)
        if on_step:
            on_step(row)
    return DepthResult(work, dropped, reduction, reduction >= amount - tolerance, trials)


def execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules in the order their forward is entered (one eval forward of batch 1)."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n) if n not in order else None)
             for n, m in model.named_modules() if n]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return order


def layers_after(model: nn.Module, example: torch.Tensor, first: str) -> list[str]:
    """Modules entered after block `first` finished (everything its removal changes the input of)."""
    order = execution_order(model, example)
    if first not in order:
        return []
    i = order.index(first)
    return [n for n in order[i + 1:] if not n.startswith(first + ".")]
