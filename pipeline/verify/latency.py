"""Latency measured honestly: warmup, fixed threads, interleaved round-robin, bootstrap CIs.

Interleaving (one call of every session per iteration, in rotating order) makes slow drift in the
machine (thermal, other processes) hit all artifacts alike, so the per-iteration pairs can be
resampled together to give a confidence interval on the speedup ratio.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

N_BOOT = 2000
SEED = 0


def bootstrap_median_ci(samples: Sequence[float], confidence: float = 0.95, n_boot: int = N_BOOT,
                        seed: int = SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median (fixed seed: the same timings give the same CI)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    meds = np.median(x[rng.integers(0, x.size, size=(n_boot, x.size))], axis=1)
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(meds, alpha)), float(np.quantile(meds, 1.0 - alpha))


def speedup_ci(baseline: Sequence[float], candidate: Sequence[float], confidence: float = 0.95,
               n_boot: int = N_BOOT, seed: int = SEED, paired: bool = True) -> tuple[float, tuple[float, float]]:
    """median(baseline)/median(candidate) and its bootstrap interval.

    Paired resampling (the same iteration indices for both) when the series have equal length,
    which is the interleaved case: iteration i of each saw the same machine state. paired=False
    for series timed apart (isolated processes), where iteration i of each means nothing.
    """
    b = np.asarray(baseline, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    ratio = float(np.median(b) / np.median(c))
    rng = np.random.default_rng(seed)
    ib = rng.integers(0, b.size, size=(n_boot, b.size))
    ic = ib if (paired and b.size == c.size) else rng.integers(0, c.size, size=(n_boot, c.size))
    ratios = np.median(b[ib], axis=1) / np.median(c[ic], axis=1)
    alpha = (1.0 - confidence) / 2.0
    return ratio, (float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1.0 - alpha)))


def summarize(times_ms: Sequence[float], batch_size: int) -> dict[str, Any]:
    """p50/p90/p99/mean/min, the median's 95% CI and throughput (images per second at the median)."""
    x = np.asarray(times_ms, dtype=np.float64)
    lo, hi = bootstrap_median_ci(x)
    p50 = float(np.median(x))
    return {
        "batch_size": batch_size, "iterations": int(x.size),
        "p50_ms": p50, "p90_ms": float(np.percentile(x, 90)), "p99_ms": float(np.percentile(x, 99)),
        "mean_ms": float(x.mean()), "min_ms": float(x.min()), "ci95_ms": [lo, hi],
        "throughput_ips": batch_size * 1000.0 / p50 if p50 > 0 else None,
    }


def measure(runners: Mapping[str, Callable[[], Any]], warmup: int, iterations: int,
            interleave: bool = True) -> dict[str, list[float]]:
    """Time each zero-argument runner `iterations` times after `warmup` calls; milliseconds.

    interleave=True: per iteration every runner runs once, the start rotating so no runner always
    goes first (cache/frequency effects). interleave=False: each runner's iterations back to back.
    """
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    times: dict[str, list[float]] = {n: [] for n in names}

    def timed(name: str) -> None:
        t0 = time.perf_counter_ns()
        runners[name]()
        times[name].append((time.perf_counter_ns() - t0) / 1e6)

    if interleave:
        for i in range(iterations):
            k = i % len(names) if names else 0
            for name in names[k:] + names[:k]:
                timed(name)
    else:
        for name in names:
            for _ in range(iterations):
                timed(name)
    return times


def current_rss_bytes() -> int | None:
    """Resident set size now, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """Process high-water RSS (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RssProbe:
    """RSS delta around `with` (session load + first inference), and how much the peak grew.

    Method: current RSS (/proc/self/statm) after minus before, plus the growth of ru_maxrss. The
    current-RSS delta is what the session keeps resident; the peak growth catches transient
    allocations but only when they exceed the process's earlier high-water mark, so it is a lower
    bound. Neither includes memory shared with earlier sessions (e.g. an already-imported library).
    """

    def __enter__(self) -> RssProbe:
        self.rss0 = current_rss_bytes()
        self.peak0 = peak_rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        rss1 = current_rss_bytes()
        self.rss_delta_bytes = None if rss1 is None or self.rss0 is None else rss1 - self.rss0
        self.peak_growth_bytes = peak_rss_bytes() - self.peak0
        self.peak_rss_bytes = peak_rss_bytes()

    def to_dict(self) -> dict[str, Any]:
        mb = 1024 * 1024
        return {
            "rss_delta_mb": None if self.rss_delta_bytes is None else self.rss_delta_bytes / mb,
            "peak_growth_mb": self.peak_growth_bytes / mb,
            "process_peak_rss_mb": self.peak_rss_bytes / mb,
            "method": "RSS (/proc/self/statm) after minus before session load + first batch; "
                      "peak growth from getrusage ru_maxrss",
        }
