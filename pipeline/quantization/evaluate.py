"""Score a quantized artifact against its FP32 reference: accuracy, top-1 agreement, max error,
and a short p50 latency per backend. Batches stream; nothing holds the whole split."""

from __future__ import annotations

import math

import time
from typing import Any

import numpy as np

from pipeline.sources.data import DataSplit


def score(session: Any, reference: Any, split: DataSplit, samples: int | None = None,
          batch_size: int = 32) -> dict[str, Any]:
    """Run `session` and the FP32 `reference` session on `split`; compare top-1 and raw outputs."""
    n = correct = ref_correct = agree = 0
    max_abs = 0.0
    signal = noise = 0.0  # for the logits' SQNR against FP32, which near-ties do not dominate
    labelled = False
    for x, y in split.batches(batch_size):
        if samples is not None and n >= samples:
            break
        if samples is not None:
            x = x[: samples - n]
            y = None if y is None else y[: samples - n]
        xn = x.numpy().astype(np.float32)
        out, ref = session.infer(xn), reference.infer(xn)
        pred, ref_pred = out.reshape(len(xn), -1).argmax(1), ref.reshape(len(xn), -1).argmax(1)
        agree += int((pred == ref_pred).sum())
        diff = out.astype(np.float64) - ref
        max_abs = max(max_abs, float(np.abs(diff).max()))
        signal, noise = signal + float((ref.astype(np.float64) ** 2).sum()), noise + float((diff ** 2).sum())
        if y is not None:
            labelled = True
            yn = y.numpy()
            correct += int((pred == yn).sum())
            ref_correct += int((ref_pred == yn).sum())
        n += len(xn)
    return {"samples": n, "agreement": agree / n if n else None,
            "accuracy": correct / n if labelled and n else None,
            "reference_accuracy": ref_correct / n if labelled and n else None,
            "max_abs_err": max_abs,
            "sqnr_db": (round(10 * math.log10(signal / noise), 3) if noise > 0 else None) if n else None}


def latency_p50(session: Any, x: np.ndarray, iterations: int = 20, warmup: int = 3) -> float:
    """Median wall time in ms of `iterations` single runs: a quick look, verify does statistics."""
    for _ in range(warmup):
        session.infer(x)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        session.infer(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def backend_latencies(path: Any, precision: str, x: np.ndarray, backends: list[str], threads: int,
                      iterations: int = 20) -> tuple[dict[str, float | None], dict[str, Any]]:
    """p50 per backend, plus describe() of each; a backend that cannot run gives None and a reason."""
    from pipeline.backends import get_backend
    from pipeline.backends.base import BackendUnavailable

    lat: dict[str, float | None] = {}
    info: dict[str, Any] = {}
    for name in backends:
        module = get_backend(name)
        try:
            sess = module.load(path, threads=threads, precision_hint=precision)
        except Exception as exc:  # unavailable, or this backend cannot read this file: a visible skip
            reason = str(exc) if isinstance(exc, BackendUnavailable) else f"{type(exc).__name__}: {exc}"
            lat[name], info[name] = None, {"skipped": reason[:300]}
            continue
        with sess:
            lat[name] = round(latency_p50(sess, x, iterations), 4)
            info[name] = sess.describe()
    return lat, info

