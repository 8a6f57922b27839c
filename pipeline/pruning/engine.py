"""Structured pruning with torch-pruning's DepGraph: one pruned copy per call, never in place.

`prune_copy` prunes a deep copy by a channel ratio; `prune_to_target` bisects that ratio until a
MACs / params / peak-memory reduction is met. Layer names the user gives are validated here, the
classifier is found and protected, and attention layers get the head bookkeeping torch-pruning
needs (nn.MultiheadAttention heads; custom qkv attention is left whole because its forward
reshapes by the original width). `guards` hides the graph patterns torch-pruning cannot map.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.errors import BadInput, StageFailed
from pipeline.profiling.stats import ChannelStats
from pipeline.pruning.guards import (ATTENTION_REASON, SHUFFLE_REASON, attention_modules, guarded_trace,
                                     shuffle_coupled_layers)
from pipeline.pruning.importance import StatsImportance, make_importance
from pipeline.pruning.measure import LAYER_TYPES, model_cost, out_channels


@dataclass(frozen=True)
class PruneSettings:
    """Everything that decides *how* channels are chosen; the ratio is passed per call."""

    criterion: str = "activation"
    global_pruning: bool = False
    ignored: tuple[str, ...] = ()  # validated module names
    round_to: int | None = None
    iterative_steps: int = 1
    correlation_aware: bool = False
    # per-group ratio multipliers (sensitivity allocation): group root layer name -> weight
    layer_weights: tuple[tuple[str, float], ...] = ()
    max_layer_ratio: float = 0.9


@dataclass
class Protection:
    """Layers left alone on purpose, by name, with the reason shown in the report."""

    reasons: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, reason: str) -> None:
        self.reasons.setdefault(name, reason)


def check_layer_names(model: nn.Module, names: list[str] | tuple[str, ...], key: str) -> None:
    """BadInput naming the recipe `key` and the first of `names` that is not a module of `model`,
    with close matches."""
    known = [n for n, _ in model.named_modules() if n]
    known_set = set(known)
    for name in names:
        if name not in known_set:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
            hint = f"; did you mean: {', '.join(close)}" if close else ""
            raise BadInput(f"{key}: no layer named '{name}' in the model{hint}")


def resolve_ignored(model: nn.Module, names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Check user layer names exist; an unknown one is BadInput naming it with close matches."""
    check_layer_names(model, names, "prune.ignore")
    return tuple(names)


@torch.no_grad()
def find_classifier(model: nn.Module, example: torch.Tensor) -> str | None:
    """The last Conv/Linear executed whose output width equals the model's class count."""
    order: list[tuple[str, nn.Module]] = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: order.append((n, m)))
             for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    was_training = model.training
    try:
        out = model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = _first_tensor(out)
    if out is None or out.dim() < 2:
        return None
    num_classes = out.shape[1]
    for name, m in reversed(order):
        if out_channels(m) == num_classes:
            return name
    return None


def default_protection(model: nn.Module, example: torch.Tensor, user_ignored: tuple[str, ...] = ()) -> Protection:
    """User-ignored layers plus the classifier, which is always kept at num_classes outputs."""
    protect = Protection()
    for name in user_ignored:
        protect.add(name, "ignored by user")
    classifier = find_classifier(model, example)
    if classifier:
        protect.add(classifier, "classifier (num_classes outputs)")
    return protect


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)) and out:
        return _first_tensor(out[0])
    if hasattr(out, "logits"):
        return out.logits
    return None


def attention_protection(model: nn.Module, protect: Protection) -> dict[nn.Module, int]:
    """Head counts for nn.MultiheadAttention; custom qkv attention modules are left whole."""
    num_heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for name, m in attention_modules(model).items():
        protect.add(name, ATTENTION_REASON)
        for child, sub in m.named_modules():
            if isinstance(sub, LAYER_TYPES):
                protect.add(f"{name}.{child}" if name else child, ATTENTION_REASON)
    return num_heads


def shuffle_protection(model: nn.Module, example: torch.Tensor, protect: Protection) -> None:
    """Protect the layers feeding a channel shuffle (their groups would need a permutation)."""
    for name in shuffle_coupled_layers(model, example):
        protect.add(name, SHUFFLE_REASON)


def _fix_attributes(model: nn.Module) -> None:
    """Models that cache a width outside their layers (torchvision ViT's hidden_dim) follow the layers."""
    for m in model.modules():
        if hasattr(m, "hidden_dim") and isinstance(getattr(m, "conv_proj", None), nn.Conv2d):
            m.hidden_dim = m.conv_proj.out_channels


def prune_copy(model: nn.Module, example: torch.Tensor, ratio: float, settings: PruneSettings,
               protect: Protection, stats: ChannelStats | None = None,
               grads: dict[str, torch.Tensor] | None = None,
               kept_out: dict[str, list[int]] | None = None) -> nn.Module:
    """A pruned deep copy of `model` at channel `ratio` (the input model is never touched).

    `kept_out`, when given, is filled with layer name -> the original output channels it keeps
    (layers whose width changed), which `reconstruct` needs to pick the teacher's matching outputs.
    """
    import torch_pruning as tp

    work = copy.deepcopy(model).eval()
    if ratio <= 0:
        return work
    if grads:
        for name, p in work.named_parameters():
            if name in grads:
                p.grad = grads[name].clone()
    modules = dict(work.named_modules())
    num_heads = attention_protection(work, protect)
    imp = make_importance(settings.criterion, work, stats, settings.correlation_aware)
    try:
        shuffle_protection(work, example, protect)
        ignored = [modules[n] for n in (*settings.ignored, *protect.reasons) if n in modules]
        per_layer = {modules[n]: min(settings.max_layer_ratio, ratio * w) for n, w in settings.layer_weights
                     if n in modules and modules[n] not in ignored}
        with guarded_trace(work) as customized:  # the graph is built here, pruned below
            pruner = tp.pruner.BasePruner(
                work, example[:1], importance=imp, global_pruning=settings.global_pruning,
                pruning_ratio=ratio, pruning_ratio_dict=per_layer or None,
                ignored_layers=ignored, round_to=settings.round_to,
                iterative_steps=settings.iterative_steps, num_heads=num_heads,
                customized_pruners=customized or None,
            )
        for _ in range(settings.iterative_steps):
            for group in pruner.step(interactive=True):
                if isinstance(imp, StatsImportance):
                    imp.forget(group)
                if kept_out is not None:
                    _track_kept(work, group, kept_out)
                group.prune()
    except (BadInput, StageFailed):
        raise
    except Exception as exc:  # torch-pruning raises bare errors on graphs it cannot handle
        raise StageFailed(f"torch-pruning could not prune this model: {type(exc).__name__}: {exc}") from exc
    _fix_attributes(work)
    for p in work.parameters():
        p.grad = None
    return work


def _track_kept(work: nn.Module, group: Any, kept_out: dict[str, list[int]]) -> None:
    """Record which original output channels survive this group's removal (indices shift per step)."""
    import torch_pruning as tp

    fn = tp.pruner.function
    names = {m: n for n, m in work.named_modules()}
    for dep, idxs in group:
        if dep.handler not in (fn.prune_conv_out_channels, fn.prune_linear_out_channels):
            continue
        m = dep.target.module
        name = names.get(m)
        if name is None:
            continue
        current = kept_out.setdefault(name, list(range(out_channels(m))))
        gone = set(int(i) for i in idxs)
        kept_out[name] = [c for i, c in enumerate(current) if i not in gone]


@dataclass
class SearchResult:
    model: nn.Module
    ratio: float
    reduction: float
    reached: bool
    trials: list[dict[str, float]]
    kept_out: dict[str, list[int]] = field(default_factory=dict)  # layer -> original out channels kept


COST_KEY = {"macs": "macs", "params": "params", "peak_memory": "liveness_peak_bytes"}


def prune_to_target(model: nn.Module, example: torch.Tensor, target: str, amount: float,
                    settings: PruneSettings, protect: Protection, stats: ChannelStats | None = None,
                    grads: dict[str, torch.Tensor] | None = None, tolerance: float = 0.02,
                    max_trials: int = 10, max_ratio: float = 0.95,
                    on_trial: Callable[[dict[str, float]], None] | None = None) -> SearchResult:
    """Bisect the channel ratio until the `target` cost drops by `amount` (within `tolerance`).

    Cost falls monotonically (roughly quadratically for MACs) with the ratio, so the first guess
    is 1 - sqrt(1 - amount) and each later trial halves the bracket. Returns the smallest ratio
    whose reduction is >= amount - tolerance, or the strongest trial if none gets there.
    """
    kept: dict[int, dict[str, list[int]]] = {}

    def run(r: float) -> nn.Module:
        out: dict[str, list[int]] = {}
        m = prune_copy(model, example, r, settings, protect, stats, grads, kept_out=out)
        kept[id(m)] = out
        return m

    if target == "ratio":
        m = run(amount)
        return SearchResult(m, amount, amount, True, [], kept[id(m)])
    key = COST_KEY[target]
    base = model_cost(model, example)[key]
    if not base:
        raise StageFailed(f"prune target '{target}' needs a {key} measurement, which is unavailable")
    lo, hi = 0.0, max_ratio
    r = min(max_ratio, 1.0 - (1.0 - amount) ** 0.5 if target == "macs" else amount)
    trials: list[dict[str, float]] = []
    best: tuple[float, float, nn.Module] | None = None  # (ratio, reduction, model)
    strongest: tuple[float, float, nn.Module] | None = None
    for _ in range(max_trials):
        m = run(r)
        red = 1.0 - model_cost(m, example)[key] / base
        trial = {"ratio": round(r, 4), "reduction": round(red, 4)}
        trials.append(trial)
        if on_trial:
            on_trial(trial)
        if strongest is None or red > strongest[1]:
            strongest = (r, red, m)
        if red >= amount - tolerance:
            if best is None or r < best[0]:
                best = (r, red, m)
            if red <= amount + tolerance:
                break
            hi = r
        else:
            lo = r
        if hi - lo < 1e-3:
            break
        r = (lo + hi) / 2
    if best is not None:
        return SearchResult(best[2], best[0], best[1], True, trials, kept[id(best[2])])
    assert strongest is not None
    return SearchResult(strongest[2], strongest[0], strongest[1], False, trials, kept[id(strongest[2])])


def taylor_gradients(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """Gradients for TaylorImportance: CE on labels (or on the model's own argmax if unlabeled)."""
    work = copy.deepcopy(model).eval()
    work.zero_grad()
    for x, y in batches:
        out = _first_tensor(work(x))
        if out is None:
            raise StageFailed("taylor criterion needs a model that returns a logits tensor")
        target = y if y is not None else out.detach().argmax(1)
        torch.nn.functional.cross_entropy(out, target).backward()
    return {n: p.grad.detach().clone() for n, p in work.named_parameters() if p.grad is not None}


def left_alone(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], model: nn.Module,
               protect: Protection) -> list[dict[str, str]]:
    """Every Conv/Linear whose output width did not change, with the reason it was left alone."""
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, LAYER_TYPES):
            continue
        if name not in before:
            rows.append({"name": name, "reason": "not executed in the forward pass"})
            continue
        if name in after and after[name]["channels"] != before[name]["channels"]:
            continue
        reason = protect.reasons.get(name)
        if reason is None:
            reason = ("coupled to a protected layer, the network output or a reshape; "
                      "or the ratio rounded to zero channels")
        rows.append({"name": name, "reason": reason})
    return rows
