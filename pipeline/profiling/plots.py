"""Profile plots (matplotlib Agg, PNG, written atomically). Imported only when plots are wanted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_path


def _figure(width: float = 10, height: float = 4) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _ticks(ax: Any, names: list[str], max_labels: int = 40) -> None:
    step = max(1, len(names) // max_labels)
    idx = list(range(0, len(names), step))
    ax.set_xticks(idx)
    ax.set_xticklabels([names[i] for i in idx], rotation=90, fontsize=6)


def plot_layer_memory(profile: dict[str, Any], path: Path) -> Path:
    """Output bytes of every node, the node where the liveness peak happens in red."""
    layers = profile["layers"]
    names = [r["name"] for r in layers]
    values = np.array([r["bytes"] for r in layers], dtype=float) / 2**20
    peak_at = profile["memory"]["peak_at"]
    fig, ax = _figure()
    colors = ["tab:red" if n == peak_at else "tab:blue" for n in names]
    ax.bar(range(len(names)), values, color=colors)
    ax.set_ylabel("output MiB")
    ax.set_title(f"Activation memory per layer (peak at {peak_at}, red)")
    _ticks(ax, names)
    return _save(fig, path)


def plot_timeline(profile: dict[str, Any], path: Path) -> Path:
    """Live activation bytes along execution order, with the measured peak as a reference line."""
    names = [t[0] for t in profile["timeline"]]
    live = np.array([t[1] for t in profile["timeline"]], dtype=float) / 2**20
    mem = profile["memory"]
    fig, ax = _figure()
    ax.plot(range(len(live)), live, label="liveness estimate")
    ax.axhline(mem["naive_sum_bytes"] / 2**20, color="tab:gray", ls=":", label="naive sum of outputs")
    if mem.get("measured_peak_bytes"):
        ax.axhline(mem["measured_peak_bytes"] / 2**20, color="tab:red", ls="--", label="measured peak")
    ax.set_ylabel("live MiB")
    ax.set_yscale("log")
    ax.set_title(f"Activation memory timeline (batch {mem['batch_size']})")
    ax.legend(fontsize=8)
    _ticks(ax, names)
    return _save(fig, path)


def plot_redundancy(redundancy: dict[str, dict[str, Any]], path: Path) -> Path:
    """Mean APoZ and dead-channel fraction per measured layer."""
    names = list(redundancy)
    apoz = [redundancy[n]["mean_apoz"] for n in names]
    dead = [redundancy[n]["dead"] / max(redundancy[n]["channels"], 1) for n in names]
    fig, ax = _figure()
    x = np.arange(len(names))
    ax.bar(x - 0.2, apoz, width=0.4, label="mean APoZ")
    ax.bar(x + 0.2, dead, width=0.4, label="dead fraction")
    ax.set_ylim(0, 1)
    ax.set_title("Per-layer redundancy")
    ax.legend(fontsize=8)
    _ticks(ax, names)
    return _save(fig, path)


def plot_correlation(corr: np.ndarray, layer: str, path: Path) -> Path:
    """|r| heatmap of one layer's channels."""
    fig, ax = _figure(6, 5)
    im = ax.imshow(np.abs(corr), vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(im, ax=ax, label="|r|")
    ax.set_title(f"Channel correlation: {layer}")
    ax.set_xlabel("channel")
    ax.set_ylabel("channel")
    return _save(fig, path)
