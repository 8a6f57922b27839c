"""Accuracy against labels and agreement with the FP32 original, accumulated batch by batch.

Agreement (same top-1 class as the original) works without labels, so an unlabelled eval split
still tells whether compression changed the model's decisions. Near-ties make top-1 agreement a
harsh proxy on images that are not the model's domain, so two more numbers stand beside it:
agreement on the *confident* subset (the original's top-1 softmax probability >= 0.5) and the
SQNR of the logits against the original's (dB), which ties do not affect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

CONFIDENT = 0.5  # the original's top-1 softmax probability that makes a sample "confident"
SQNR_CAP_DB = 200.0  # identical outputs: a finite number keeps report.json valid JSON


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return SQNR_CAP_DB
    if not np.isfinite(noise) or signal == 0:
        return -SQNR_CAP_DB
    return round(min(SQNR_CAP_DB, 10 * float(np.log10(signal / noise))), 3)


@dataclass
class AccuracyAccumulator:
    """Streams (logits, reference logits, labels) batches; `result()` gives the metrics dict."""

    samples: int = 0
    top1_hits: int = 0
    top5_hits: int = 0
    labelled: int = 0
    agree: int = 0
    abs_err_sum: float = 0.0
    abs_err_count: int = 0
    max_abs_err: float = 0.0
    num_classes: int | None = None
    nonfinite: int = 0
    confident: int = 0
    confident_agree: int = 0
    signal_energy: float = 0.0
    noise_energy: float = 0.0
    _shape_mismatch: list[str] = field(default_factory=list)

    def update(self, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> None:
        logits = np.asarray(logits, dtype=np.float32).reshape(len(reference), -1)
        reference = np.asarray(reference, dtype=np.float32).reshape(len(reference), -1)
        if logits.shape != reference.shape:
            self._shape_mismatch.append(f"{logits.shape} vs {reference.shape}")
            return
        self.num_classes = logits.shape[1]
        self.samples += len(logits)
        self.nonfinite += int((~np.isfinite(logits)).any(axis=1).sum())
        pred = logits.argmax(axis=1)
        same = pred == reference.argmax(axis=1)
        self.agree += int(same.sum())
        ref64 = reference.astype(np.float64)
        shifted = np.exp(ref64 - ref64.max(axis=1, keepdims=True))
        sure = shifted.max(axis=1) / shifted.sum(axis=1) >= CONFIDENT
        self.confident += int(sure.sum())
        self.confident_agree += int((same & sure).sum())
        self.signal_energy += float((ref64 ** 2).sum())
        if np.isfinite(logits).all():
            self.noise_energy += float(((logits.astype(np.float64) - ref64) ** 2).sum())
        else:
            self.noise_energy = float("inf")
        err = np.abs(logits.astype(np.float64) - reference)
        self.abs_err_sum += float(np.nansum(err))
        self.abs_err_count += err.size
        if err.size:
            self.max_abs_err = max(self.max_abs_err, float(np.nanmax(err)) if np.isfinite(err).any() else np.inf)
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            self.labelled += len(labels)
            self.top1_hits += int((pred == labels).sum())
            if self.num_classes > 5:
                top5 = np.argpartition(-logits, 5, axis=1)[:, :5]
                self.top5_hits += int((top5 == labels[:, None]).any(axis=1).sum())

    def result(self) -> dict[str, Any]:
        """top1/top5 are None without labels (top5 also when there are 5 classes or fewer)."""
        out: dict[str, Any] = {
            "samples": self.samples,
            "top1": self.top1_hits / self.labelled if self.labelled else None,
            "top5": self.top5_hits / self.labelled if self.labelled and (self.num_classes or 0) > 5 else None,
            "agreement": self.agree / self.samples if self.samples else None,
            "max_abs_err": self.max_abs_err if self.samples else None,
            "mean_abs_err": self.abs_err_sum / self.abs_err_count if self.abs_err_count else None,
            "nonfinite_outputs": self.nonfinite,
            "agreement_confident": self.confident_agree / self.confident if self.confident else None,
            "confident_samples": self.confident,
            "sqnr_db": _sqnr_db(self.signal_energy, self.noise_energy) if self.samples else None,
        }
        if self._shape_mismatch:
            out["error"] = f"output shape differs from the original: {self._shape_mismatch[0]}"
        return out
