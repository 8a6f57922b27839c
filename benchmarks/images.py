"""A deterministic set of real photos for benchmarks: crops of every bundled photo.

The photos and the cropping live in `pipeline.sources.photos` (the recipes' `photos` data source
uses them too); this keeps the benchmarks' historical call, crops cycling through *all* photos:

    from benchmarks.images import bundled_images
    x = bundled_images(128)          # float32 tensor [128, 3, 224, 224], same every call
"""

from __future__ import annotations

import torch

from pipeline.sources.photos import IMAGENET_MEAN, IMAGENET_STD, SKIMAGE_PHOTOS, crops, describe, source_photos

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SKIMAGE_PHOTOS", "bundled_images", "describe", "source_photos"]


def bundled_images(n: int = 128, size: int = 224, seed: int = 0) -> torch.Tensor:
    """`n` crops of all bundled photos, [n, 3, size, size] float32, ImageNet-normalised."""
    return crops(list(source_photos().values()), n, size, seed)
