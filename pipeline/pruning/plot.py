"""The "channels kept per layer" plot, so a reader sees at a glance where pruning cut."""

from __future__ import annotations

from pathlib import Path

from pipeline.atomic import atomic_path


def plot_channels(layers: list[dict], path: Path, title: str = "Channels kept per layer") -> Path:
    """Bar chart: original width (light) and pruned width (dark) for every Conv/Linear layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["name"] for row in layers]
    before = [row["channels_before"] for row in layers]
    after = [row["channels_after"] for row in layers]
    width = max(6.0, min(40.0, 0.18 * len(names) + 2))
    fig, ax = plt.subplots(figsize=(width, 4.5))
    x = range(len(names))
    ax.bar(x, before, color="#c7d7ee", label="before")
    ax.bar(x, after, color="#2b5d9c", label="after")
    ax.set_ylabel("output channels")
    ax.set_title(title)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=6 if len(names) > 40 else 8)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
