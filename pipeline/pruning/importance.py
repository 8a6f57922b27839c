"""Pruning criteria as torch-pruning `Importance` objects, so DepGraph does the surgery.

The activation criteria rank channels by the profiler's streaming statistics (one array per
Conv2d/Linear output channel, keyed by module name). Because those statistics index the *original*
channels, the importance object also tracks deletions (`forget`) so that iterative pruning keeps
scoring the right channels after earlier steps removed some.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from torch import nn

from pydantic import AfterValidator

from pipeline.errors import BadInput
from pipeline.profiling.stats import ChannelStats, LayerStats
from pipeline.registry import Registry

# name -> factory(model, stats, correlation_aware) -> a torch-pruning Importance; `@criterion(name)`
# registers one (here, or in a plug-in file).
MakeImportance = Callable[[nn.Module, "ChannelStats | None", bool], Any]
CRITERIA: Registry[MakeImportance] = Registry("prune criterion",
                                              order=("activation", "apoz", "l1", "l2", "taylor", "bn_scale"))
NEEDS_STATS: set[str] = set()  # criteria that rank by the profiler's channel statistics
DEAD_SCORE = -1.0  # below every normalised live score, so dead channels always go first
REDUNDANT_SCALE = 1e-3  # the weaker channel of a near-duplicate pair ranks just above the dead ones
HIGH_CORR = 0.95


@dataclass
class _Scores:
    """Per-channel score of one layer, in the layer's current channel order."""

    score: np.ndarray  # higher = more important
    dead: np.ndarray


def layer_scores(st: LayerStats, criterion: str, correlation_aware: bool) -> _Scores:
    """Turn one layer's statistics into a score (higher keeps), dead flags, duplicate demotion."""
    if criterion == "apoz":
        score = 1.0 - np.asarray(st.apoz, dtype=np.float64)
    else:
        score = np.asarray(st.mean_abs, dtype=np.float64).copy()
    score = np.nan_to_num(score, nan=0.0)
    dead = np.asarray(st.dead, dtype=bool).copy()
    if correlation_aware and st.corr is not None and len(score) > 1:
        score = _demote_duplicates(score, np.asarray(st.corr), dead)
    return _Scores(score=score, dead=dead)


def _demote_duplicates(score: np.ndarray, corr: np.ndarray, dead: np.ndarray) -> np.ndarray:
    """Of each pair with |r| > 0.95, demote the weaker channel (greedy, strongest pairs first).

    Only one member of a pair is demoted, so a cluster of duplicates keeps its best channel.
    """
    out = score.copy()
    c = np.abs(np.nan_to_num(corr, nan=0.0))
    np.fill_diagonal(c, 0.0)
    ii, jj = np.where(np.triu(c > HIGH_CORR, k=1))
    order = np.argsort(-c[ii, jj])
    demoted = np.zeros(len(score), dtype=bool)
    for k in order:
        i, j = int(ii[k]), int(jj[k])
        if demoted[i] or demoted[j] or dead[i] or dead[j]:
            continue
        weak = i if score[i] < score[j] else j
        demoted[weak] = True
    out[demoted] *= REDUNDANT_SCALE
    return out


class StatsImportance:
    """Activation (`activation`: low mean |a| first) or APoZ (`apoz`: high APoZ first) importance.

    Implements torch-pruning's `Importance` protocol (`__call__(group) -> 1-D scores`). A group's
    score is the mean over its Conv/Linear members that have statistics, normalised by its mean so
    global pruning compares groups fairly; dead channels (dead in every measured member) score -1.
    Groups without any measured member fall back to L2 magnitude.
    """

    def __init__(self, model: nn.Module, stats: ChannelStats, criterion: str = "activation",
                 correlation_aware: bool = False) -> None:
        import torch_pruning as tp

        self.criterion = criterion
        self._name = {m: n for n, m in model.named_modules()}
        self._scores: dict[str, _Scores] = {}
        modules = dict(model.named_modules())
        for name, st in stats.layers.items():
            if name in modules:
                self._scores[name] = layer_scores(st, criterion, correlation_aware)
        self._fallback = tp.importance.MagnitudeImportance(p=2)
        self._tp = tp

    def _out_entries(self, group) -> Iterable[tuple[str, list[int], list[int]]]:
        fn = self._tp.pruner.function
        for i, (dep, idxs) in enumerate(group):
            if dep.handler not in (fn.prune_conv_out_channels, fn.prune_linear_out_channels):
                continue
            name = self._name.get(dep.target.module)
            if name in self._scores:
                yield name, list(idxs), list(group[i].root_idxs)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        n = len(group[0][1])
        total = torch.zeros(n, dtype=torch.float64)
        count = torch.zeros(n, dtype=torch.float64)
        dead_all = torch.ones(n, dtype=torch.bool)
        measured = False
        for name, idxs, root_idxs in self._out_entries(group):
            s = self._scores[name]
            if any(r is None for r in root_idxs) or max(idxs, default=-1) >= len(s.score):
                continue
            roots = torch.tensor(root_idxs, dtype=torch.long)
            total.index_add_(0, roots, torch.from_numpy(s.score[idxs]))
            count.index_add_(0, roots, torch.ones(len(idxs), dtype=torch.float64))
            dead_here = torch.zeros(n, dtype=torch.bool)
            dead_here[roots] = torch.from_numpy(s.dead[idxs])
            dead_all &= dead_here | (count == 0)
            measured = True
        if not measured:
            return self._fallback(group)
        score = total / count.clamp(min=1)
        mean = score[score > 0].mean() if (score > 0).any() else torch.tensor(1.0, dtype=torch.float64)
        score = score / mean
        score[dead_all & (count > 0)] = DEAD_SCORE
        return score.float()

    def forget(self, group) -> None:
        """Drop the statistics of the channels this group removes (call right before group.prune())."""
        removals = [(name, sorted(set(idxs))) for name, idxs, _ in self._out_entries(group)]
        for name, idxs in removals:
            s = self._scores[name]
            keep = np.ones(len(s.score), dtype=bool)
            keep[[i for i in idxs if i < len(keep)]] = False
            self._scores[name] = _Scores(score=s.score[keep], dead=s.dead[keep])


def criterion(name: str, needs_stats: bool = False) -> Callable[[MakeImportance], MakeImportance]:
    """Register the decorated factory `(model, stats, correlation_aware) -> Importance` as `name`."""

    def wrap(make: MakeImportance) -> MakeImportance:
        CRITERIA.add(name, make)
        if needs_stats:
            NEEDS_STATS.add(name)
        return make

    return wrap


def _check_criterion(name: str) -> str:
    if name not in CRITERIA:
        raise ValueError(f"expected a registered criterion: {' | '.join(repr(n) for n in CRITERIA.names())}")
    return name


CriterionName = Annotated[str, AfterValidator(_check_criterion)]  # a registered criterion, for configs


@criterion("activation", needs_stats=True)
def _activation(model: nn.Module, stats: ChannelStats | None, correlation_aware: bool) -> StatsImportance:
    return _stats_importance("activation", model, stats, correlation_aware)


@criterion("apoz", needs_stats=True)
def _apoz(model: nn.Module, stats: ChannelStats | None, correlation_aware: bool) -> StatsImportance:
    return _stats_importance("apoz", model, stats, correlation_aware)


def _stats_importance(name: str, model: nn.Module, stats: ChannelStats | None,
                      correlation_aware: bool) -> StatsImportance:
    if stats is None:
        raise BadInput(f"prune criterion '{name}' needs channel statistics (calibration data)")
    return StatsImportance(model, stats, name, correlation_aware)


@criterion("l1")
def _l1(model: nn.Module, stats: ChannelStats | None, correlation_aware: bool) -> Any:
    import torch_pruning as tp

    return tp.importance.MagnitudeImportance(p=1)


@criterion("l2")
def _l2(model: nn.Module, stats: ChannelStats | None, correlation_aware: bool) -> Any:
    import torch_pruning as tp

    return tp.importance.MagnitudeImportance(p=2)


@criterion("taylor")
def _taylor(model: nn.Module, stats: ChannelStats | None, correlation_aware: bool) -> Any:
    import torch_pruning as tp

    return tp.importance.TaylorImportance()


@criterion("bn_scale")
def _bn_scale(model: nn.Module, stats: ChannelStats | None, correlation_aware: bool) -> Any:
    import torch_pruning as tp

    return tp.importance.BNScaleImportance()


def make_importance(criterion: str, model: nn.Module, stats: ChannelStats | None = None,
                    correlation_aware: bool = False) -> Any:
    """Build the torch-pruning Importance for a registered `criterion` (BadInput when unknown)."""
    return CRITERIA.get(criterion)(model, stats, correlation_aware)
