"""The agreement noise floor: how often the original disagrees with itself under invisible noise.

Top-1 agreement is read against 100%, but on images outside a model's domain many inputs sit near
a tie between two classes, and a change no one can see flips them. On 576 crops of the bundled
photos, EfficientNet-Lite0 keeps its own top-1 on only 85.8% of them under Gaussian noise of one
8-bit grey level (benchmarks/RESULTS.md); a compressed model at 81% there is close to the floor, and
a `min_agreement` gate of 0.9 would measure tie-breaking, not compression. So verify runs the
original once more on the same inputs plus such noise and reports its agreement with itself.

One grey level is estimated from the inputs themselves, per channel: (max - min) / 255 over the
batch, which is 2/255 for images scaled to [-1, 1] and 1/255/std for mean/std-normalised ones,
whatever normalisation the recipe used. Only image batches (N, C, H, W) get a floor.
"""

from __future__ import annotations

import numpy as np

GREY_LEVELS = 255  # steps of an 8-bit image


def grey_level(x: np.ndarray) -> np.ndarray | None:
    """One 8-bit step of each channel's value range in `x` (N, C, H, W), shaped to broadcast; None
    for inputs that are not image batches or that hold a single value."""
    if x.ndim != 4 or x.size == 0:
        return None
    span = x.max(axis=(0, 2, 3)) - x.min(axis=(0, 2, 3))
    if not np.isfinite(span).all() or not (span > 0).any():
        return None
    return (span / GREY_LEVELS).astype(np.float32).reshape(1, -1, 1, 1)


def with_grey_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """`x` plus Gaussian noise of one grey level (per channel); None where `grey_level` is None."""
    sigma = grey_level(x)
    if sigma is None:
        return None
    return (x + sigma * rng.standard_normal(x.shape, dtype=np.float32)).astype(np.float32)
