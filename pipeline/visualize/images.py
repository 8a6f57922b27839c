"""Load user images for `fmap visualize`: one image file, a folder of images, or an .npz with x (and y).

Images are converted to the model's channel count (L or RGB), resized to its input size, scaled to
[0, 1] and normalised with the given mean/std, so the model sees what it saw in training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.errors import BadInput
from pipeline.sources.data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "load_images"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def load_images(path: str | Path, input_shape: list[int], mean: list[float] | None = None,
                std: list[float] | None = None, limit: int | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """Return (x float32 [N,C,H,W], y int64 [N] or None, names) from an image file, folder or .npz."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"--images '{p}': no such file or folder")
    channels, height, width = input_shape[-3], input_shape[-2], input_shape[-1]
    if p.suffix.lower() == ".npz":
        x, y = _load_npz(p, channels, height, width)
        names = [f"{p.name}[{i}]" for i in range(len(x))]
    else:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise BadInput(f"--images '{p}': no images found (expected {', '.join(sorted(IMAGE_SUFFIXES))} or .npz)")
        files = files[:limit] if limit else files
        x = torch.stack([_load_image(f, channels, height, width) for f in files])
        y, names = None, [f.name for f in files]
    if limit:
        x, names = x[:limit], names[:limit]
        y = None if y is None else y[:limit]
    if mean is not None and std is not None:
        m = torch.tensor(mean[:channels] if len(mean) >= channels else mean * channels).view(1, -1, 1, 1)
        s = torch.tensor(std[:channels] if len(std) >= channels else std * channels).view(1, -1, 1, 1)
        x = (x - m) / s
    return x.float(), y, names


def _load_image(path: Path, channels: int, height: int, width: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise BadInput(f"--images: cannot read image '{path}': {exc}") from None
    t = torch.from_numpy(arr)
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] != channels:
        raise BadInput(f"--images: '{path}' has {t.shape[0]} channels, the model expects {channels}")
    return t


def _load_npz(path: Path, channels: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadInput(f"--images '{path}': not a readable .npz ({exc})") from None
    if "x" not in data:
        raise BadInput(f"--images '{path}': no array 'x' (found: {', '.join(data.files)})")
    x = np.asarray(data["x"])
    if x.ndim == 3:
        x = x[:, None] if channels == 1 else x[..., None]
    if x.ndim == 4 and x.shape[1] != channels and x.shape[-1] == channels:
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if x.ndim != 4 or x.shape[1] != channels:
        raise BadInput(f"--images '{path}': x has shape {list(x.shape)}, expected N x {channels} x H x W")
    t = torch.from_numpy(x.astype(np.float32))
    if x.dtype == np.uint8:
        t = t / 255.0
    if tuple(t.shape[-2:]) != (height, width):
        t = torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    y = torch.from_numpy(np.asarray(data["y"]).astype(np.int64)) if "y" in data else None
    return t, y
