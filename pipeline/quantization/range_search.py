"""Per-tensor activation range search (`calibration: mse`): choose each tensor's clipping range by
the quantization error it causes on the calibration data, instead of one rule for every tensor.

Min-max keeps every outlier and spends the 256 levels on them; a fixed percentile clips every
tensor alike; entropy (KL) matches shapes, not errors. For each activation tensor this pass builds
a 2048-bin histogram over its min-max range (one pass over the calibration data, all tensors at
once) and evaluates candidate ranges [lo, hi] that keep 100%, 99.999%, ... 99.5% of the mass on
each side: the expected squared error is the rounding noise (step^2 / 12) for values inside plus
the clipping error for values outside. The cheapest candidate wins, per tensor (Banner et al.;
the "MSE range setting" of Nagel et al.'s white paper, 2021).

It works on onnxruntime's calibration cache: min-max calibration writes it, this pass rewrites the
ranges, and every later quantize_static call (the fallback's too) reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

BINS = 2048
TAILS = (0.0, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # mass clipped on each side, per candidate
LEVELS = 255


def refine_cache(cache: Path, float_path: Path, reader: Any) -> dict[str, Any]:
    """Rewrite `cache` (min-max ranges) with the MSE-best range per tensor; returns a summary."""
    from onnxruntime.quantization.calibrate import TensorData, load_tensors_data, save_tensors_data

    data = load_tensors_data(cache)
    ranges = {name: (float(np.asarray(td.range_value[0]).min()), float(np.asarray(td.range_value[1]).max()))
              for name, td in data.items()}
    hists = _histograms(float_path, ranges, reader)
    clipped = 0
    for name, (lo, hi) in ranges.items():
        if name not in hists:
            continue
        new_lo, new_hi = best_range(hists[name], lo, hi)
        if (new_lo, new_hi) != (lo, hi):
            clipped += 1
        data[name] = TensorData(lowest=np.array(new_lo, dtype=np.float32), highest=np.array(new_hi, dtype=np.float32))
    save_tensors_data(data, cache)
    return {"tensors": len(hists), "clipped": clipped}


def best_range(hist: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The candidate [lo', hi'] (0 always inside, as onnxruntime requires) of least expected MSE."""
    edges = np.linspace(lo, hi, len(hist) + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    total = hist.sum()
    if total == 0 or hi <= lo:
        return lo, hi
    cdf = np.cumsum(hist) / total
    best, best_err = (lo, hi), np.inf
    for t_lo in TAILS:
        c_lo = lo if t_lo == 0 else float(edges[np.searchsorted(cdf, t_lo)])
        for t_hi in TAILS:
            c_hi = hi if t_hi == 0 else float(edges[min(np.searchsorted(cdf, 1 - t_hi) + 1, len(hist))])
            c_lo2, c_hi2 = min(c_lo, 0.0), max(c_hi, 0.0)
            if c_hi2 <= c_lo2:
                continue
            err = _expected_mse(hist, centres, c_lo2, c_hi2)
            if err < best_err:
                best, best_err = (c_lo2, c_hi2), err
    return best


def _expected_mse(hist: np.ndarray, centres: np.ndarray, lo: float, hi: float) -> float:
    step = (hi - lo) / LEVELS
    inside = (centres >= lo) & (centres <= hi)
    clip = np.where(centres < lo, lo - centres, np.where(centres > hi, centres - hi, 0.0))
    return float((hist * np.where(inside, step * step / 12.0, clip * clip)).sum())


def _histograms(float_path: Path, ranges: dict[str, tuple[float, float]], reader: Any) -> dict[str, np.ndarray]:
    """One pass: a histogram of every named float tensor over its min-max range."""
    import onnx

    from pipeline.quantization.graph import tensor_batches

    model = onnx.load(str(float_path))
    known = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    names = [n for n in ranges if n in known]
    hists = {n: np.zeros(BINS, dtype=np.float64) for n in names}
    for arrays in tensor_batches(model, names, reader):
        for name in names:
            lo, hi = ranges[name]
            if hi > lo:
                hists[name] += np.histogram(np.asarray(arrays[name], dtype=np.float32), bins=BINS, range=(lo, hi))[0]
    return hists
