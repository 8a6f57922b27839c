"""Input checks that need the built model or the loaded data: fail before any stage, with one line.

Each catches a mistake that otherwise ran to the end with meaningless numbers (NaN weights gave
top-1 9% with agreement 1.0; labels outside the model's classes gave top-1 0.0 and exit 0) or
crashed mid-run with a library error (NaN inputs in the quantizer, an unreadable image in verify).
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import BadInput


def check_finite_weights(model: Any, source: str) -> None:
    """Every floating parameter and buffer must be finite."""
    import torch

    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise BadInput(f"{source}: weight '{name}' has {bad} NaN/Inf value(s); fmap refuses non-finite weights")


def output_classes(output: Any) -> int | None:
    """Number of classes of a classifier's output (N, C); None for other output shapes."""
    import torch

    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif isinstance(output, dict) and output:
        output = next(iter(output.values()))
    if isinstance(output, torch.Tensor) and output.ndim == 2:
        return int(output.shape[1])
    return None


def check_split(split: Any, model: Any, classes: int | None) -> None:
    """One small batch of `split` runs through the model; labels lie in [0, classes)."""
    import torch

    name = getattr(split, "name", "data")
    labels = getattr(split, "y", None)
    if classes is not None and getattr(split, "has_labels", False):
        if isinstance(labels, torch.Tensor) and labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= classes:
                raise BadInput(f"data.{name}: labels range over [{lo}, {hi}] but the model has {classes} "
                               f"outputs (labels must be 0..{classes - 1})")
        elif labels is None and split.num_classes is not None and split.num_classes > classes:
            raise BadInput(f"data.{name}: {split.num_classes} classes (class folders) but the model has "
                           f"{classes} outputs")
    try:
        x, _ = split.first_batch(2)
    except BadInput:
        raise
    except Exception as exc:  # a transform that cannot apply to these samples
        raise BadInput(f"data.{name}: cannot load a first batch: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:
        raise BadInput(f"data.{name}: the model fails on its samples of shape {list(x.shape[1:])}: "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
