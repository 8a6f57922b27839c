"""Optional TensorBoard export: activation histograms per layer and the model graph.

Only when the `tensorboard` package is importable (torch.utils.tensorboard needs it); otherwise the
caller gets a reason string to show as a visible skip. ONNX artifacts need no export: open the
.onnx file in Netron as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def tensorboard_unavailable() -> str | None:
    """None when export can run, else why not."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        return f"tensorboard not installed ({exc}); pip install tensorboard"
    return None


def export_tensorboard(log_dir: Path, model: nn.Module, example: torch.Tensor,
                       activations: dict[str, torch.Tensor]) -> Path:
    """Write histograms of each layer's activations and the traced graph into `log_dir`."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for name, act in activations.items():
            writer.add_histogram(f"activations/{name}", act.float().cpu(), global_step=0)
        try:
            writer.add_graph(model, example[:1])
        except Exception as exc:  # graph tracing fails on some dynamic models; histograms still useful
            writer.add_text("graph", f"add_graph failed: {exc}")
    finally:
        writer.close()
    return log_dir
