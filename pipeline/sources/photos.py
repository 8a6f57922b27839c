"""Real photos for ImageNet models, offline: the colour photos inside scikit-learn and scikit-image.

No dataset can be downloaded, yet quantization and pruning quality must be judged on natural
images (edges, textures, colour statistics), never on noise. scikit-learn's wheel ships two photos
(china, flower) and scikit-image's ships several more (astronaut, coffee, chelsea, rocket, ...).
Crops of them, seeded and ImageNet-normalised, make the `builtin` data source `photos`:

- the *calibration* and *train* splits crop the photos at even positions of the sorted list,
- the *test* split crops the others, so evaluation never sees a photo that calibration saw.

The crops have no ImageNet labels: quality is agreement with the FP32 model (top-1 decisions
identical), which verify reports without labels.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pipeline.sources.data import IMAGENET_MEAN, IMAGENET_STD

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                  "retina")
SPLIT_SEEDS = {"calibration": 0, "train": 1, "test": 2}


@lru_cache(maxsize=1)
def _cached_photos() -> tuple[tuple[str, np.ndarray], ...]:
    from sklearn.datasets import load_sample_images

    sk = load_sample_images()
    photos = {Path(name).stem: img for name, img in zip(sk.filenames, sk.images)}
    try:
        import skimage.data as skd
    except ImportError:
        skd = None
    for name in SKIMAGE_PHOTOS if skd is not None else ():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = getattr(skd, name)()
        except Exception:  # a photo that would need a download (pooch) in this skimage version
            continue
        if img.ndim == 3 and img.shape[2] >= 3:
            photos[name] = np.ascontiguousarray(img[..., :3])
    return tuple((k, photos[k]) for k in sorted(photos))


def source_photos() -> dict[str, np.ndarray]:
    """name -> HxWx3 uint8 photo, from every installed source (sklearn always, skimage if present)."""
    return dict(_cached_photos())


def split_photos(split: str) -> dict[str, np.ndarray]:
    """The photos a split crops: even positions for calibration/train, odd positions for test."""
    photos = list(source_photos().items())
    if split == "test":
        return dict(photos[1::2])
    return dict(photos[0::2])


def crops(photos: list[np.ndarray], n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """`n` crops, [n, 3, size, size] float32, ImageNet-normalised, the same for the same arguments.

    Crops cycle through the photos; each takes a random square covering 35-100% of the shorter
    side at a random position, and about half are mirrored.
    """
    rng = np.random.default_rng(seed)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.35, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = torch.from_numpy(np.ascontiguousarray(img[top:top + side, left:left + side])).permute(2, 0, 1)
        crop = crop.float().div(255.0).unsqueeze(0)
        crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                               align_corners=False)[0]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        out[i] = (crop.clamp(0, 1) - mean) / std
    return out


def photo_split(split: str, n: int, size: int = 224) -> torch.Tensor:
    """The crops of one split: disjoint photos between calibration/train and test."""
    photos = list(split_photos(split).values())
    if len(source_photos()) < 4:
        from pipeline.errors import BadInput

        raise BadInput("data source 'photos' needs scikit-image's bundled photos: pip install 'fmap[models]'")
    return crops(photos, n, size, seed=SPLIT_SEEDS[split])


def describe(split: str | None = None) -> str:
    """One line for reports: which photos a split was built from."""
    return ", ".join(source_photos() if split is None else split_photos(split))
