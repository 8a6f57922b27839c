"""Which layers to look at, what they output, and which of their channels respond most.

Layers are module names as in `model.named_modules()`; activations are captured with forward
hooks (the last call wins when a module is reused), so any nn.Module works without tracing.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator

import torch
from torch import nn

from pipeline.errors import BadInput

VISUAL_TYPES = (nn.Conv2d, nn.ConvTranspose2d)


def conv_layers(model: nn.Module) -> list[str]:
    """Names of the 2-D convolutions in definition order (a proxy for depth)."""
    return [name for name, m in model.named_modules() if isinstance(m, VISUAL_TYPES)]


def spread_layers(convs: list[str], count: int = 3) -> list[str]:
    """~`count` of `convs` spread across depth: first, middle(s), last, so early edges and late parts show."""
    if len(convs) <= count:
        return list(convs)
    idx = sorted({round(i * (len(convs) - 1) / (count - 1)) for i in range(count)})
    return [convs[i] for i in idx]


def default_layers(model: nn.Module, count: int = 3) -> list[str]:
    return spread_layers(conv_layers(model), count)


def unknown_layers_error(unknown: list[str], names: list[str], convs: list[str] | None = None) -> BadInput:
    """One line naming each unknown layer's close matches (difflib) and the first conv layers."""
    hints = []
    for r in unknown:
        close = difflib.get_close_matches(r, names, n=5, cutoff=0.5)
        hints.append(f"'{r}'" + (f" (did you mean: {', '.join(close)}?)" if close else ""))
    convs = names if convs is None else convs
    return BadInput(f"visualize: unknown layer {'; '.join(hints)}; conv layers: {', '.join(convs[:12])}")


def resolve_layers(model: nn.Module, requested: list[str] | None, count: int = 3) -> list[str]:
    """Validate requested layer names (BadInput naming close matches) or choose defaults."""
    if not requested:
        layers = default_layers(model, count)
        if not layers:
            raise BadInput("visualize: the model has no Conv2d layer; name layers with --layers / layers:")
        return layers
    names = [n for n, _ in model.named_modules() if n]
    unknown = [r for r in requested if r not in names]
    if unknown:
        raise unknown_layers_error(unknown, names, conv_layers(model))
    return list(requested)


@contextlib.contextmanager
def record(model: nn.Module, layers: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, forward passes store each layer's output (detached) in the yielded dict."""
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:
        def hook(_m: nn.Module, _i: object, o: object, name: str = name) -> None:
            if isinstance(o, torch.Tensor):
                out[name] = o.detach().clone()  # clone: a later in-place ReLU would rewrite it
        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture(model: nn.Module, x: torch.Tensor, layers: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run `x` once; return (logits, {layer: activation [N,C,H,W]})."""
    with record(model, layers) as acts:
        logits = model(x)
    return logits, dict(acts)


def top_channels(act: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k channels with the highest mean activation over batch and space: (index, mean)."""
    means = act.float().mean(dim=[d for d in range(act.ndim) if d != 1])
    k = min(k, means.numel())
    values, idx = torch.topk(means, k)
    return [(int(i), float(v)) for i, v in zip(idx, values)]
