"""Augmentation for distillation on a small set of unlabelled images (torchvision transforms.v2).

Distillation needs no labels, so every augmented view is a new training example: the teacher
labels it on the fly. Random resized crops, horizontal flips and mild colour jitter turn a few
hundred photos into many distinct views. Inputs arrive already normalised for the model, so the
colour jitter runs on each image rescaled to [0, 1] by its own min/max and is mapped back after.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class AugmentConfig(BaseModel):
    """`{crop_scale: [0.35, 1.0], flip: true, color_jitter: 0.1}`; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_scale: tuple[float, float] = (0.35, 1.0)  # area fraction of RandomResizedCrop
    flip: bool = True
    color_jitter: float = Field(0.1, ge=0, le=0.5)  # brightness/contrast/saturation strength

    @field_validator("crop_scale")
    @classmethod
    def _check_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("expected [low, high] with 0 < low <= high <= 1")
        return v


class Augmenter:
    """Per-sample random views of a batch (each image gets its own crop, flip and jitter)."""

    def __init__(self, cfg: AugmentConfig, seed: int = 0) -> None:
        from torchvision.transforms import v2

        self.cfg = cfg
        self.flip = v2.RandomHorizontalFlip() if cfg.flip else None
        j = cfg.color_jitter
        self.jitter = v2.ColorJitter(brightness=j, contrast=j, saturation=j) if j > 0 else None
        self.generator = torch.Generator().manual_seed(seed)
        self._v2 = v2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return x  # not an image batch: nothing sensible to crop
        size = list(x.shape[-2:])
        crop = self._v2.RandomResizedCrop(size, scale=self.cfg.crop_scale, antialias=True)
        state = torch.get_rng_state()
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
        try:
            return torch.stack([self._one(img, crop) for img in x])
        finally:
            torch.set_rng_state(state)  # the caller's random stream is not disturbed

    def _one(self, img: torch.Tensor, crop) -> torch.Tensor:
        img = crop(img)
        if self.flip is not None:
            img = self.flip(img)
        if self.jitter is not None and img.shape[0] in (1, 3):
            lo, hi = img.amin(), img.amax()
            span = (hi - lo).clamp_min(1e-6)
            img = self.jitter((img - lo) / span) * span + lo
        return img
