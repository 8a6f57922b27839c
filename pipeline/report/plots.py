"""Plots for the HTML report, rendered by matplotlib (Agg) straight to base64 PNG for inlining.

Each function returns None when its input is missing, so a skipped stage simply has no plot.
"""

from __future__ import annotations

import base64
import io
from typing import Any


def _fig(width: float = 8.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, plt.subplots(figsize=(width, height), dpi=90)


def _png(plt: Any, fig: Any) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def memory_timeline(timeline: list[Any] | None, peak_at: str | None = None) -> str | None:
    if not timeline:
        return None
    pts = [(str(p[0]), float(p[1])) for p in timeline if isinstance(p, (list, tuple)) and len(p) >= 2]
    if not pts:
        return None
    plt, (fig, ax) = _fig()
    ax.plot(range(len(pts)), [b / 2**20 for _, b in pts], marker=".", lw=1)
    ax.set_xlabel("execution step (node)")
    ax.set_ylabel("live activations (MB)")
    ax.set_title("Activation memory timeline" + (f" (peak at {peak_at})" if peak_at else ""))
    return _png(plt, fig)


def redundancy(red: dict[str, Any] | None) -> str | None:
    if not red:
        return None
    names = list(red)[:60]
    dead = [(red[n].get("dead") or 0) / max(red[n].get("channels") or 1, 1) for n in names]
    apoz = [red[n].get("mean_apoz") or 0.0 for n in names]
    plt, (fig, ax) = _fig(max(8.0, len(names) * 0.25), 3.4)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], dead, width=0.4, label="dead channel fraction")
    ax.bar([x + 0.2 for x in xs], apoz, width=0.4, label="mean APoZ")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Redundancy per layer")
    return _png(plt, fig)


def pruning(layers: list[dict[str, Any]] | None) -> str | None:
    rows = [r for r in layers or [] if r.get("channels_before") is not None]
    if not rows:
        return None
    rows = rows[:60]
    plt, (fig, ax) = _fig(max(8.0, len(rows) * 0.25), 3.4)
    xs = range(len(rows))
    ax.bar(list(xs), [r["channels_before"] for r in rows], color="#bbb", label="before")
    ax.bar(list(xs), [r.get("channels_after") or 0 for r in rows], color="#2a7", label="after")
    ax.set_xticks(list(xs), [str(r.get("name")) for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("channels")
    ax.legend(fontsize=8)
    ax.set_title("Channels per layer: pruning")
    return _png(plt, fig)


def layer_errors(errors: list[dict[str, Any]] | None) -> str | None:
    """Bar chart of the first numeric error field of each quantized layer."""
    pts = []
    for e in errors or []:
        name = e.get("layer") or e.get("name") or e.get("node")
        val = next((e[k] for k in ("rel_error", "relative_error", "mse", "max_abs_err", "error", "sqnr_db")
                    if isinstance(e.get(k), (int, float))), None)
        if name is not None and val is not None:
            pts.append((str(name), float(val), k_label(e)))
    if not pts:
        return None
    pts = pts[:60]
    plt, (fig, ax) = _fig(max(8.0, len(pts) * 0.25), 3.4)
    ax.bar(range(len(pts)), [v for _, v, _ in pts], color="#c63")
    ax.set_xticks(list(range(len(pts))), [n for n, _, _ in pts], rotation=90, fontsize=7)
    ax.set_ylabel(pts[0][2])
    ax.set_title("Quantization error per layer")
    return _png(plt, fig)


def k_label(e: dict[str, Any]) -> str:
    return next((k for k in ("rel_error", "relative_error", "mse", "max_abs_err", "error", "sqnr_db")
                 if isinstance(e.get(k), (int, float))), "error")


def latency(rows: list[dict[str, Any]]) -> str | None:
    rows = [r for r in rows if r.get("p50_ms") is not None]
    if not rows:
        return None
    plt, (fig, ax) = _fig(8.0, max(2.0, 0.45 * len(rows) + 1))
    labels = [f"{r['artifact']}@{r['backend']}" for r in rows]
    p50 = [r["p50_ms"] for r in rows]
    err = [[p - (r.get("p50_ci95_ms") or [p, p])[0] for p, r in zip(p50, rows)],
           [(r.get("p50_ci95_ms") or [p, p])[1] - p for p, r in zip(p50, rows)]]
    ax.barh(range(len(rows)), p50, xerr=err, color="#37a", capsize=3)
    ax.set_yticks(list(range(len(rows))), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"p50 latency (ms), batch {rows[0]['batch_size']}, 95% CI")
    return _png(plt, fig)
