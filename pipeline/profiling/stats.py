"""Per-channel activation statistics (the profile stage writes them, the prune stage ranks by them).

Data containers live here; the streaming collector that fills them is `collect_channel_stats`.
Keys are module names of Conv2d/Linear layers (as in `model.named_modules()`); each array has one
entry per output channel of that layer.

The collector streams: it keeps running sums (float64, shifted by the first batch's channel means
for numerical stability) and never stores activations, so memory is O(C^2) per layer whatever the
number of calibration batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HIGH_CORR = 0.95  # |r| above this counts a channel pair as redundant


@dataclass
class LayerStats:
    mean_abs: np.ndarray  # [C] mean |activation| per channel
    apoz: np.ndarray  # [C] average percentage of zeros, measured after the following ReLU-like op
    variance: np.ndarray  # [C]
    dead: np.ndarray  # [C] bool: always zero or constant over every sample seen
    samples: int  # number of input samples seen
    mean_rank: np.ndarray | None = None  # [C] HRank-style average feature-map rank (subsample)
    corr: np.ndarray | None = None  # [C, C] inter-channel Pearson correlation
    num_high_corr_pairs: int = 0  # channel pairs with |r| > 0.95
    measured_at: str = ""  # the module/op whose output was measured (e.g. the ReLU after the conv)


_ARRAYS = ("mean_abs", "apoz", "variance", "dead", "mean_rank", "corr")


@dataclass
class ChannelStats:
    layers: dict[str, LayerStats] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write an .npz (atomically). Layer i's arrays are stored as 'i.<field>'; names in '__layers__'."""
        from pipeline.atomic import atomic_path

        names = list(self.layers)
        arrays: dict[str, np.ndarray] = {"__layers__": np.array(names, dtype=np.str_)}
        for i, name in enumerate(names):
            st = self.layers[name]
            for key in _ARRAYS:
                value = getattr(st, key)
                if value is not None:
                    arrays[f"{i}.{key}"] = np.asarray(value, dtype=np.float32) if key == "corr" else np.asarray(value)
            arrays[f"{i}.samples"] = np.asarray(st.samples, dtype=np.int64)
            arrays[f"{i}.num_high_corr_pairs"] = np.asarray(st.num_high_corr_pairs, dtype=np.int64)
            arrays[f"{i}.measured_at"] = np.asarray(st.measured_at, dtype=np.str_)
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ChannelStats:
        with np.load(path, allow_pickle=False) as data:
            names = [str(n) for n in data["__layers__"]]
            layers = {}
            for i, name in enumerate(names):
                def get(key: str, i: int = i) -> np.ndarray | None:
                    k = f"{i}.{key}"
                    return data[k] if k in data.files else None

                corr = get("corr")
                layers[name] = LayerStats(
                    mean_abs=get("mean_abs"), apoz=get("apoz"), variance=get("variance"),  # type: ignore[arg-type]
                    dead=get("dead").astype(bool), samples=int(get("samples")),  # type: ignore[union-attr, arg-type]
                    mean_rank=get("mean_rank"), corr=None if corr is None else corr.astype(np.float64),
                    num_high_corr_pairs=int(get("num_high_corr_pairs")),  # type: ignore[arg-type]
                    measured_at=str(get("measured_at")),
                )
        return cls(layers)


class _Scratch:
    """A float32 buffer reused by every accumulator (they run one after another) for the
    per-batch temporaries, so no activation-sized tensor is allocated and page-faulted per op."""

    def __init__(self) -> None:
        self.flat: Any = None

    def like(self, v: Any) -> Any:
        """A contiguous float32 tensor of v's shape (contents undefined)."""
        import torch

        if self.flat is None or self.flat.numel() < v.numel():
            self.flat = torch.empty(v.numel(), dtype=torch.float32)
        return self.flat[: v.numel()].view(v.shape)


class _Accumulator:
    """Running per-channel sums for one layer's output. `update` takes [N, C, ...] or [N, ..., C].

    Each batch is reduced with float32 torch ops on a [G, C, P] view and only the per-channel
    results are added to float64 sums. Passes over the activation: min, max, a sign count of the
    nonzeros, the shifted copy, its sum and one batched matmul (a sum of squares without
    correlation); |x| costs one more pass only where the measured tensor has negative values.
    """

    def __init__(self, channel_dim: int, correlation: bool, rank_samples: int, scratch: _Scratch | None = None) -> None:
        self.scratch = scratch or _Scratch()
        self.channel_dim = channel_dim
        self.correlation = correlation
        self.rank_samples = rank_samples
        self.samples = 0
        self.n = 0  # values per channel seen
        self.shift: Any = None  # float64 [C]: the first batch's channel means
        self.shift32: Any = None  # the same as the float32 [1, C, 1] actually subtracted
        self.sums: dict[str, Any] = {}
        self.rank_sum: Any = None
        self.rank_count = 0

    def _start(self, v: Any) -> None:
        """Fix the shift from the first batch and allocate the float64 sums."""
        import torch

        c = v.shape[1]
        self.shift = v.sum((0, 2)).double() / (v.shape[0] * v.shape[2])
        self.shift32 = self.shift.float()[None, :, None]
        z = lambda: torch.zeros(c, dtype=torch.float64)  # noqa: E731
        self.sums = {"abs": z(), "s1": z(), "s2": z(), "zeros": z(),
                     "min": torch.full((c,), float("inf"), dtype=torch.float64),
                     "max": torch.full((c,), float("-inf"), dtype=torch.float64)}
        if self.correlation:
            self.sums["xx"] = torch.zeros(c, c, dtype=torch.float64)

    def update(self, x: Any) -> None:
        import torch

        x = x.detach()
        if x.dim() < 2:
            return
        c = x.shape[self.channel_dim]
        # [G, C, P] view without copying: conv maps as [N, C, H*W], linear outputs as [1, C, rows]
        v = x.reshape(x.shape[0], c, -1) if self.channel_dim == 1 else x.reshape(-1, c).T[None]
        v = v.float()
        if self.shift is None:
            self._start(v)
        count = v.shape[0] * v.shape[2]
        s = self.sums
        lo = v.amin((0, 2))
        s["min"] = torch.minimum(s["min"], lo.double())
        s["max"] = torch.maximum(s["max"], v.amax((0, 2)).double())
        tmp = self.scratch.like(v)  # one reused buffer: no fresh pages per op
        if bool((lo >= 0).all()):  # post-ReLU: |x| == x, and sign(x) is 1 exactly where x != 0
            nonneg = True
            torch.sign(v, out=tmp)
        else:
            nonneg = False
            s["abs"] += torch.abs(v, out=tmp).sum((0, 2)).double()
            tmp.sign_()
        s["zeros"] += count - _count_ones(tmp, count)
        xc = torch.sub(v, self.shift32, out=tmp)
        s1 = xc.sum((0, 2)).double()
        s["s1"] += s1
        if nonneg:  # sum|x| comes from the shifted sum
            s["abs"] += s1 + self.shift * count
        if self.correlation:
            xx = torch.bmm(xc, xc.transpose(1, 2)).sum(0).double()
            s["xx"] += xx
            s["s2"] += torch.diagonal(xx)
        else:
            s["s2"] += xc.square_().sum((0, 2)).double()
        self.n += count
        self.samples += int(x.shape[0])
        self._update_rank(x)

    def _update_rank(self, x: Any) -> None:
        """HRank: the matrix rank of each feature map, on the first `rank_samples` samples only."""
        import torch

        take = min(self.rank_samples - self.rank_count, int(x.shape[0]))
        if take > 0 and x.dim() == 4 and self.channel_dim == 1:
            ranks = torch.linalg.matrix_rank(x[:take].float()).double()  # [take, C]
            self.rank_sum = ranks.sum(0) if self.rank_sum is None else self.rank_sum + ranks.sum(0)
            self.rank_count += take

    def finish(self, measured_at: str) -> LayerStats:
        s = {k: v.numpy() for k, v in self.sums.items()}
        n = max(self.n, 1)
        m = s["s1"] / n
        var = np.maximum(s["s2"] / n - m * m, 0.0)
        spread = s["max"] - s["min"]
        dead = spread <= 1e-7 * np.maximum(np.abs(s["max"]), 1.0)
        corr, pairs = None, 0
        if self.correlation:
            cov = s["xx"] / n - np.outer(m, m)
            std = np.sqrt(np.maximum(np.diag(cov), 0.0))
            ok = std > 1e-12
            denom = np.outer(std, std)
            corr = np.where(np.outer(ok, ok), cov / np.where(denom > 0, denom, 1.0), 0.0)
            corr = np.clip(corr, -1.0, 1.0)
            np.fill_diagonal(corr, np.where(ok, 1.0, 0.0))
            iu = np.triu_indices(corr.shape[0], k=1)
            pairs = int((np.abs(corr[iu]) > HIGH_CORR).sum())
        rank = None if self.rank_sum is None else (self.rank_sum / self.rank_count).numpy()
        return LayerStats(mean_abs=s["abs"] / n, apoz=s["zeros"] / n, variance=var, dead=dead, samples=self.samples,
                          mean_rank=rank, corr=corr, num_high_corr_pairs=pairs, measured_at=measured_at)


def _count_ones(indicator: Any, count: int) -> Any:
    """Per-channel sum of a 0/1 [G, C, P] tensor as float64.

    A float32 sum of 0/1 values is exact below 2**24 per channel and is ~10x faster on CPU than
    `count_nonzero` or summing a bool tensor (int64 accumulation); larger batches sum in float64.
    """
    import torch

    dtype = torch.float32 if count < 2**24 else torch.float64
    return indicator.sum((0, 2), dtype=dtype).double()


def default_layers(model: Any) -> list[str]:
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def collect_channel_stats(model: Any, batches: Iterable[Any], layers: list[str] | None = None,
                          rank_samples: int = 64, progress: Callable[[int], None] | None = None, *,
                          correlation: bool = True, max_batches: int | None = None) -> ChannelStats:
    """Stream every batch through `model` and return per-channel statistics of each layer.

    `batches` yields input tensors (or (x, y) tuples). Statistics are taken where each layer's
    zeros really appear: after the ReLU-like op that follows it (through BatchNorm), else at the
    layer's own output; `LayerStats.measured_at` says which. `rank_samples=0` skips HRank ranks.
    `progress(n)` is called after each batch with its number of samples.
    """
    import torch
    from torch import nn

    from pipeline.errors import BadInput

    modules = dict(model.named_modules())
    layers = default_layers(model) if layers is None else list(layers)
    for name in layers:
        if name not in modules:
            raise BadInput(f"layer '{name}' is not a module of the model")
    scratch = _Scratch()
    accs = {name: _Accumulator(-1 if isinstance(modules[name], nn.Linear) else 1, correlation, rank_samples, scratch)
            for name in layers}
    runner, handles, targets = _instrument(model, accs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                runner(x)
                if progress is not None:
                    progress(int(x.shape[0]))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return ChannelStats({name: acc.finish(targets[name]) for name, acc in accs.items() if acc.shift is not None})



def _instrument(model: Any, accs: dict[str, _Accumulator]) -> tuple[Any, list[Any], dict[str, str]]:
    """(callable running the model with observers, hook handles, layer -> measured_at).

    With fx, observers are graph nodes inserted right after the measured op, so a ReLU module that
    is called twice is observed only at the call that follows the layer. Models fx cannot trace
    get plain forward hooks on the layer modules (measured at the layer's own output).
    """
    import torch
    from torch import nn

    from pipeline.profiling.graph import _try_trace, activation_nodes

    gm = _try_trace(model)
    if gm is None:
        modules = dict(model.named_modules())
        handles = [modules[name].register_forward_hook(lambda m, a, o, acc=acc: acc.update(o))
                   for name, acc in accs.items()]
        return model, handles, {name: name for name in accs}

    class Observe(nn.Module):
        """Feeds the value to accumulators; its output is unused, the graph runs on unchanged."""

        def __init__(self, names: list[str]) -> None:
            super().__init__()
            self.names = names

        def forward(self, x: torch.Tensor) -> None:
            for name in self.names:
                accs[name].update(x)

    chosen = activation_nodes(gm, list(accs))
    by_node: dict[str, list[str]] = {}
    for layer, (node_name, _) in chosen.items():
        by_node.setdefault(node_name, []).append(layer)
    for i, node in enumerate(list(gm.graph.nodes)):
        if node.name in by_node:
            obs_name = f"_fmap_observer_{i}"
            gm.add_submodule(obs_name, Observe(by_node[node.name]))
            with gm.graph.inserting_after(node):
                gm.graph.call_module(obs_name, (node,))
    gm.recompile()
    return gm, [], {layer: display for layer, (_, display) in chosen.items()}
