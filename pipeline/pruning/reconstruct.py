"""Least-squares reconstruction after pruning: refit the layers that read pruned channels.

Removing channels takes their contribution away from every consumer. For a 1x1 convolution or a
Linear layer the best weights on the channels that remain have a closed form (ridge regression
of the original layer's output on the pruned model's input, as in He et al. 2017, "Channel
Pruning", and ThiNet): no labels, no gradients, one forward pass of each model on calibration
images. Layers are refitted in forward order inside one pass of the pruned model (a pre-forward
hook solves and writes the weights before the layer runs), so each layer also corrects the error
left by the ones before it. Depthwise-separable networks are mostly such layers: the projection
and expansion 1x1 convs of every inverted-residual block, the head conv and the classifier.

The ridge term pulls towards the pruned weights themselves, so a layer with few calibration rows
(the classifier sees one row per image) moves only as far as the data supports.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.pruning.engine import _first_tensor

MAX_ROWS = 16384  # sampled (image, position) rows per layer
RIDGE = 1e-2  # ridge strength relative to the mean diagonal of X^T X


def _fittable(m: nn.Module) -> bool:
    """Layers whose output at a position depends only on the input channels at that position."""
    if isinstance(m, nn.Linear):
        return True
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1
            and m.padding in ((0, 0), 0) and m.dilation == (1, 1))


def _in_width(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] or [N, ..., C] -> [rows, C] (channels last)."""
    if t.dim() == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


def targets(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Names of the 1x1 conv / Linear layers whose input width pruning changed."""
    t_mods = dict(teacher.named_modules())
    return [n for n, m in student.named_modules()
            if _fittable(m) and n in t_mods and _fittable(t_mods[n]) and _in_width(m) < _in_width(t_mods[n])]


@torch.no_grad()
def _teacher_outputs(teacher: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    mods = dict(teacher.named_modules())
    out: dict[str, torch.Tensor] = {}
    hooks = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, o)) for n in names]
    try:
        teacher.eval()(images)
    finally:
        for h in hooks:
            h.remove()
    return out


def solve(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """argmin_W |x W - y|^2 + lam |W - w0|^2 with lam = ridge * mean diag(x^T x); float64 solve."""
    x, y, w0 = x.double(), y.double(), w0.double()
    gram = x.T @ x
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, x.T @ y + lam * w0)


def _refit(m: nn.Module, x_in: torch.Tensor, y_out: torch.Tensor, keep: list[int] | None,
           generator: torch.Generator) -> None:
    """Write the least-squares weights (and bias) of `m` for input rows x_in and teacher rows y_out."""
    x, y = _rows(x_in), _rows(y_out)
    if keep is not None:
        y = y[:, keep]
    if x.shape[0] > MAX_ROWS:
        pick = torch.randperm(x.shape[0], generator=generator)[:MAX_ROWS]
        x, y = x[pick], y[pick]
    w = m.weight.reshape(m.weight.shape[0], -1)
    if m.bias is not None:
        x = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
        w = torch.cat([w, m.bias.reshape(-1, 1)], 1)
    if y.shape[1] != w.shape[0] or x.shape[1] != w.shape[1]:
        return  # the teacher's outputs do not map onto this layer's channels: leave it
    fitted = solve(x.float(), y.float(), w.T).T.to(m.weight.dtype)
    if m.bias is not None:
        m.bias.copy_(fitted[:, -1])
        fitted = fitted[:, :-1]
    m.weight.copy_(fitted.reshape(m.weight.shape))


@torch.no_grad()
def reconstruct(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                kept_out: dict[str, list[int]] | None = None, seed: int = 0) -> list[str]:
    """Refit, in place and in forward order, every 1x1 conv / Linear of `student` that lost inputs.

    `kept_out` maps a layer to the original output channels it keeps (from the prune search), so
    the teacher's outputs can be matched when the layer's own outputs were pruned too. Returns the
    names of the refitted layers. The student is left in eval mode.
    """
    names = targets(student, teacher)
    if not names or len(images) == 0:
        return []
    y = _teacher_outputs(teacher, names, images)
    mods = dict(student.named_modules())
    g = torch.Generator().manual_seed(seed)
    done: list[str] = []

    def pre_hook(name: str) -> Any:
        def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
            x_in = args[0] if args else None
            out = y.get(name)
            if isinstance(x_in, torch.Tensor) and isinstance(out, torch.Tensor):
                _refit(m, x_in.float(), out.float(), (kept_out or {}).get(name), g)
                done.append(name)
        return hook

    hooks = [mods[n].register_forward_pre_hook(pre_hook(n)) for n in names]
    try:
        _first_tensor(student.eval()(images))
    finally:
        for h in hooks:
            h.remove()
    return done
