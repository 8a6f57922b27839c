"""Latency statistics on synthetic timings with known distributions, and the interleaved timer."""

from __future__ import annotations

import numpy as np

from pipeline.verify.latency import bootstrap_median_ci, measure, speedup_ci, summarize


def test_median_ci_covers_true_median_and_is_deterministic():
    rng = np.random.default_rng(1)
    x = rng.normal(10.0, 1.0, size=400)  # true median 10
    lo, hi = bootstrap_median_ci(x)
    assert lo < 10.0 < hi
    assert hi - lo < 0.5  # ~ 2*1.96*1.2533/sqrt(400) = 0.25
    assert (lo, hi) == bootstrap_median_ci(x)


def test_ci_coverage_is_about_95_percent():
    rng = np.random.default_rng(2)
    hits = sum(lo < 5.0 < hi for lo, hi in (bootstrap_median_ci(rng.exponential(5 / np.log(2), 60), n_boot=400)
                                          for _ in range(100)))
    assert 85 <= hits <= 100


def test_speedup_ratio_and_paired_interval():
    rng = np.random.default_rng(3)
    drift = rng.normal(0, 2.0, 200)  # shared machine noise: pairing cancels it
    base = 20.0 + drift + rng.normal(0, 0.1, 200)
    cand = 10.0 + drift / 2 + rng.normal(0, 0.1, 200)
    ratio, (lo, hi) = speedup_ci(base, cand)
    assert 1.8 < ratio < 2.2 and lo <= ratio <= hi and lo > 1.7 and hi < 2.3


def test_summarize_percentiles_and_throughput():
    s = summarize(list(range(1, 101)), batch_size=8)
    assert s["p50_ms"] == 50.5 and abs(s["p90_ms"] - 90.1) < 1e-9 and abs(s["p99_ms"] - 99.01) < 1e-9
    assert s["ci95_ms"][0] <= 50.5 <= s["ci95_ms"][1]
    assert abs(s["throughput_ips"] - 8 * 1000 / 50.5) < 1e-9 and s["iterations"] == 100


def test_measure_interleaves_round_robin_after_warmup():
    calls: list[str] = []
    runners = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = measure(runners, warmup=2, iterations=3, interleave=True)
    assert calls[:6] == list("aabbcc")
    assert calls[6:] == list("abc") + list("bca") + list("cab")
    assert all(len(t) == 3 and all(v >= 0 for v in t) for t in times.values())
    calls.clear()
    measure(runners, warmup=0, iterations=2, interleave=False)
    assert calls == list("aabbcc")


def test_rss_probe_sees_an_allocation():
    """In a fresh process: after hundreds of tests the allocator may hand back pages that are still
    resident from freed arrays, and the delta would then depend on what ran before."""
    import json
    import subprocess
    import sys

    code = ("import json, numpy as np\nfrom pipeline.verify.latency import RssProbe\n"
            "with RssProbe() as p:\n    block = np.ones(64 * 1024 * 1024 // 8)\n"
            "print(json.dumps({**p.to_dict(), 'sum': float(block.sum())}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert d["sum"] > 0 and d["rss_delta_mb"] is not None and d["rss_delta_mb"] > 40
