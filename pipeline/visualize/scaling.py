"""Computed (not measured) scaling: liveness-peak activation memory and MACs vs resolution and batch.

Uses the profiler's `pipeline.profiling.summarize(model, example_input)`, which derives both from
shapes, so the plot costs a few shape passes, not benchmarks. Both quantities are exactly linear in
batch size, so the batch curve is evaluated at batch 1 and 2 and extended linearly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESOLUTION_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def scaling_table(model: nn.Module, example: torch.Tensor,
                  summarize: Callable[[nn.Module, torch.Tensor], dict[str, Any]] | None = None) -> dict[str, Any]:
    """{"resolution": [{size, macs, peak_bytes}], "batch": [{batch, macs, peak_bytes}]} at batch 1 / base size,
    computed by `summarize` (default: the profiler's)."""
    if summarize is None:
        from pipeline.profiling import summarize as profiler_summarize

        summarize = profiler_summarize
    one = example[:1]
    h, w = one.shape[-2:]
    res = []
    for s in RESOLUTION_SCALES:
        size = (max(8, round(h * s)), max(8, round(w * s)))
        try:
            info = summarize(model, torch.zeros(1, *one.shape[1:-2], *size))
        except Exception:  # some models accept one resolution only (fixed-size linear head)
            continue
        res.append({"size": list(size), "macs": int(info["macs"]), "peak_bytes": int(info["liveness_peak_bytes"])})
    b1 = summarize(model, one)
    b2 = summarize(model, torch.cat([one, one]))
    batch = []
    for b in BATCH_SIZES:
        batch.append({"batch": b,
                      "macs": int(b1["macs"] + (b - 1) * (b2["macs"] - b1["macs"])),
                      "peak_bytes": int(b1["liveness_peak_bytes"] + (b - 1) * (b2["liveness_peak_bytes"] - b1["liveness_peak_bytes"]))})
    return {"resolution": res, "batch": batch}


def plot_scaling(table: dict[str, Any], path: Path) -> Path:
    """Two panels (resolution, batch), peak MiB on the left axis and GMACs on the right."""
    from matplotlib.figure import Figure

    from pipeline.visualize.plots import save_figure

    fig = Figure(figsize=(10, 3.8))
    for i, (key, xkey, xlabel) in enumerate([("resolution", "size", "input side (px)"), ("batch", "batch", "batch size")]):
        rows = table[key]
        xs = [r[xkey][0] if xkey == "size" else r[xkey] for r in rows]
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(xs, [r["peak_bytes"] / 2**20 for r in rows], "o-", color="tab:blue", label="peak activation MiB")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("liveness peak (MiB)", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(xs, [r["macs"] / 1e9 for r in rows], "s--", color="tab:red", label="GMACs")
        ax2.set_ylabel("GMACs", color="tab:red")
        ax.set_title(f"computed vs {xlabel}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
