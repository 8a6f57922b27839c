"""Turn per-channel statistics into the per-layer redundancy summary reports and plots show."""

from __future__ import annotations

from typing import Any

from pipeline.profiling.stats import ChannelStats, LayerStats


def layer_summary(st: LayerStats) -> dict[str, Any]:
    c = int(st.mean_abs.shape[0])
    return {
        "channels": c,
        "dead": int(st.dead.sum()),
        "mean_apoz": float(st.apoz.mean()) if c else 0.0,
        "high_corr_pairs": int(st.num_high_corr_pairs),
        "mean_rank": None if st.mean_rank is None else float(st.mean_rank.mean()),
        "measured_at": st.measured_at,
        "samples": int(st.samples),
    }


def summarize_redundancy(stats: ChannelStats) -> dict[str, dict[str, Any]]:
    """{layer: {channels, dead, mean_apoz, high_corr_pairs, mean_rank, measured_at, samples}}."""
    return {name: layer_summary(st) for name, st in stats.layers.items()}


def redundancy_score(st: LayerStats) -> float:
    """Dead fraction + mean APoZ + fraction of highly correlated channel pairs (0..3, higher = more)."""
    c = int(st.mean_abs.shape[0])
    if c == 0:
        return 0.0
    pairs = c * (c - 1) / 2
    return float(st.dead.mean() + st.apoz.mean() + (st.num_high_corr_pairs / pairs if pairs else 0.0))


def most_redundant(stats: ChannelStats, need_corr: bool = True) -> str | None:
    """The layer with the highest redundancy score (among those with a correlation matrix)."""
    cands = {n: s for n, s in stats.layers.items() if s.corr is not None or not need_corr}
    return max(cands, key=lambda n: redundancy_score(cands[n])) if cands else None
