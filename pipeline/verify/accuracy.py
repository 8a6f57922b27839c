"""Accuracy against labels and agreement with the FP32 original, accumulated batch by batch.

Agreement (same top-1 class as the original) works without labels, so an unlabelled eval split
still tells whether compression changed the model's decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
        self.agree += int((pred == reference.argmax(axis=1)).sum())
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
        }
        if self._shape_mismatch:
            out["error"] = f"output shape differs from the original: {self._shape_mismatch[0]}"
        return out
