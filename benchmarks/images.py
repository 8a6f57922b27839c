"""A deterministic set of real photos for benchmarks, built offline from images inside installed wheels.

No downloads are possible, so the photos come from packages already installed: scikit-learn's
`load_sample_images()` (china.jpg, flower.jpg) and, when scikit-image is installed (the `bench`
extra), its bundled colour photos (astronaut, coffee, chelsea, rocket, ...). Each photo yields
random-but-seeded crops at several scales, some flipped, resized to `size` x `size` and
ImageNet-normalised. They are natural images (edges, textures, colour statistics), which is what
quantization calibration and top-1 agreement need; they have no ImageNet labels.

    from benchmarks.images import bundled_images
    x = bundled_images(128)          # float32 tensor [128, 3, 224, 224], same every call
"""

from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                  "retina")


def source_photos() -> dict[str, np.ndarray]:
    """name -> HxWx3 uint8 photo, from every installed source (sklearn always, skimage if present)."""
    import warnings
    from pathlib import Path

    from sklearn.datasets import load_sample_images

    sk = load_sample_images()
    photos = {Path(name).stem: img for name, img in zip(sk.filenames, sk.images)}
    try:
        import skimage.data as skd
    except ImportError:
        return {k: photos[k] for k in sorted(photos)}
    for name in SKIMAGE_PHOTOS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = getattr(skd, name)()
        except Exception:  # a photo that would need a download (pooch) in this skimage version
            continue
        if img.ndim == 3 and img.shape[2] >= 3:
            photos[name] = np.ascontiguousarray(img[..., :3])
    return {k: photos[k] for k in sorted(photos)}


def bundled_images(n: int = 128, size: int = 224, seed: int = 0) -> torch.Tensor:
    """`n` crops of the bundled photos, [n, 3, size, size] float32, ImageNet-normalised.

    Crops cycle through the photos; each takes a random square covering 35-100% of the shorter
    side at a random position, and every other one is mirrored. Deterministic for a given seed
    and set of installed photos (the count of photos is part of what decides the crops).
    """
    photos = list(source_photos().values())
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


def describe() -> str:
    """One line for reports: which photos the set was built from."""
    return ", ".join(source_photos())
