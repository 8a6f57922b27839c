"""Hide graph patterns torch-pruning cannot map, so its DepGraph builds fast and prunes the rest.

Two patterns break or stall torch-pruning 1.6's graph analysis on torchvision models:

* Channel shuffle (ShuffleNetV2): `view(N, g, C/g, H, W) -> transpose -> view(N, C, H, W)`. The
  reshape index mapping divides by zero. While the graph is traced, such channel-regroup views run
  as one opaque autograd node; the Conv/Linear layers feeding them are protected, so no group that
  crosses a shuffle is pruned (its channel order would need a permutation DepGraph cannot express).
* Custom qkv attention (Swin, MaxViT): the window/partition reshapes inside make the index
  mapping explode (minutes per group). Each attention module runs as one opaque node, registered
  with a frozen pruner and ignored, so the residual width it reads stays whole while MLP and conv
  hidden widths are still pruned.

The guards are active only while torch-pruning traces; the returned model runs its own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from pipeline.errors import StageFailed

QKV_NAMES = ("qkv", "to_qkv")
ATTN_OUT_NAMES = ("proj", "merge", "out_proj")
SHUFFLE_REASON = "channel shuffle (feeds a channel-regroup reshape torch-pruning cannot map)"
ATTENTION_REASON = "attention block (forward reshapes by the original width; left whole)"
_VIEW_FUNCS = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape}


class _ChannelRegroup(torch.autograd.Function):
    """A channel-splitting or -merging reshape, seen by torch-pruning as one opaque node."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        ctx.in_shape = x.shape
        return x.reshape(shape).clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.reshape(ctx.in_shape), None


class _Opaque(torch.autograd.Function):
    """Run `fn(x)` as a single autograd node (backward recomputes it), hiding its internal ops."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        ctx.fn = fn
        ctx.save_for_backward(x)
        return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(ctx.fn(xg), xg, grad)
        return None, gx


def is_channel_regroup(before: torch.Size, after: torch.Size) -> bool:
    """4-D -> 5-D splitting dim 1 into (g, C/g), or the 5-D -> 4-D merge back (channel shuffle)."""
    if len(before) == 4 and len(after) == 5:
        return after[1] * after[2] == before[1] and after[0] == before[0] and after[3:] == before[2:]
    if len(before) == 5 and len(after) == 4:
        return is_channel_regroup(after, before)
    return False


class _RegroupMode(TorchFunctionMode):
    """Route channel-regroup views through `_ChannelRegroup` while a graph is traced."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func in _VIEW_FUNCS and isinstance(out, torch.Tensor) and torch.is_grad_enabled():
            x = args[0]
            if x.requires_grad and is_channel_regroup(x.shape, out.shape):
                return _ChannelRegroup.apply(x, tuple(out.shape))
        return out


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Custom attention modules: a qkv/to_qkv Linear child and an output projection child."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            continue
        children = dict(m.named_children())
        if any(isinstance(children.get(q), nn.Linear) for q in QKV_NAMES) and \
                any(isinstance(children.get(o), nn.Linear) for o in ATTN_OUT_NAMES):
            found[name] = m
    return found


def _child(m: nn.Module, names: tuple[str, ...]) -> nn.Linear:
    return next(getattr(m, n) for n in names if isinstance(getattr(m, n, None), nn.Linear))


def frozen_pruner() -> Any:
    """A torch-pruning pruner for attention modules: reports widths, refuses to prune.

    The modules are always ignored too, so any group they belong to is skipped; the refusal is
    a guard against a silently broken model if that ever changes.
    """
    import torch_pruning as tp

    class FrozenAttention(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer: nn.Module, idxs):  # type: ignore[no-untyped-def]
            raise StageFailed(f"internal: attention block {type(layer).__name__} must not be pruned")

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: nn.Module) -> int:
            return _child(layer, ATTN_OUT_NAMES).out_features

        def get_in_channels(self, layer: nn.Module) -> int:
            return _child(layer, QKV_NAMES).in_features

    return FrozenAttention()


@contextlib.contextmanager
def guarded_trace(model: nn.Module) -> Iterator[dict[type, Any]]:
    """While active: attention modules are opaque, channel-regroup views are opaque.

    Yields the `customized_pruners` mapping to hand to torch-pruning. Restores every forward.
    """
    attn = attention_modules(model)
    for m in attn.values():
        orig = m.forward
        m.forward = (lambda x, *a, _f=orig, **k: _Opaque.apply(lambda t: _f(t, *a, **k), x))  # type: ignore[method-assign]
    pruners = {type(m): frozen_pruner() for m in attn.values()}
    try:
        with _RegroupMode():
            yield pruners
    finally:
        for m in attn.values():
            del m.forward


def shuffle_coupled_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Conv/Linear layers whose output channels are tied to a channel-regroup view (autograd walk).

    Producers: layers whose outputs reach a regroup without passing another layer. Consumers:
    depthwise convs reading a regroup's output (their outputs are tied to their inputs).
    """
    out_fn: dict[Any, str] = {}
    depthwise_in: dict[str, Any] = {}

    def record(name: str, m: nn.Module) -> Callable[..., None]:
        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            out_fn[out.grad_fn] = name
            if _is_depthwise(m) and inp[0].grad_fn is not None:
                depthwise_in[name] = inp[0].grad_fn
        return hook

    hooks = [m.register_forward_hook(record(n, m)) for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.enable_grad(), _RegroupMode():
            out = model(example[:1].detach().requires_grad_(True))
    finally:
        for h in hooks:
            h.remove()
    tensors = [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
    regroups = _find_nodes(tensors, lambda fn: type(fn).__name__.startswith("_ChannelRegroup"))
    if not regroups:
        return []
    found = {name for node in regroups for name in _upstream_layers(node, out_fn, regroups)}
    for name, fn in depthwise_in.items():
        if fn in regroups or _reaches(fn, regroups, out_fn):
            found.add(name)
    return sorted(found)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _upstream_layers(node: Any, out_fn: dict[Any, str], stop: set[Any]) -> set[str]:
    """Layers whose outputs reach `node` without passing through another layer or a `stop` node."""
    stack, seen, found = [f for f, _ in node.next_functions if f is not None], set(), set()
    while stack:
        fn = stack.pop()
        if fn in seen or fn in stop:
            continue
        seen.add(fn)
        if fn in out_fn:
            found.add(out_fn[fn])
            continue
        stack.extend(f for f, _ in getattr(fn, "next_functions", ()) if f is not None)
    return found


def _reaches(start: Any, targets: set[Any], out_fn: dict[Any, str]) -> bool:
    """Whether walking back from `start` hits a target before any layer output."""
    stack, seen = [start], set()
    while stack:
        fn = stack.pop()
        if fn in seen or fn in out_fn:
            continue
        if fn in targets:
            return True
        seen.add(fn)
        stack.extend(f for f, _ in getattr(fn, "next_functions", ()) if f is not None)
    return False


def _find_nodes(outputs: list[torch.Tensor], match: Callable[[Any], bool]) -> set[Any]:
    """Every autograd node reachable from `outputs` for which `match` is true."""
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen: set[Any] = set()
    hits = set()
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        if match(fn):
            hits.add(fn)
        stack.extend(f for f, _ in getattr(fn, "next_functions", ()) if f is not None)
    return hits
