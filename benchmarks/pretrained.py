"""Real pretrained weights for benchmarks, offline: EfficientNet-Lite0 with its ImageNet weights.

The model is `pipeline.sources.pretrained.efficientnet_lite0` (the recipes' `builtin:efficientnet_lite0`). Lite0 was trained on inputs scaled to [-1, 1] (mean 0.5, std 0.5 per
channel), not ImageNet mean/std; `lite0_images` converts the bundled photos accordingly.

    from benchmarks.pretrained import efficientnet_lite0, lite0_images
    model = efficientnet_lite0()                   # eval mode, 1000 classes
    x = lite0_images(96)                           # [96, 3, 224, 224] crops of real photos

As a recipe model: `source: python:benchmarks.pretrained:efficientnet_lite0`.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.images import IMAGENET_MEAN, IMAGENET_STD, bundled_images
from pipeline.sources.pretrained import LITE_MEAN, LITE_STD
from pipeline.sources.pretrained import efficientnet_lite0 as _lite0

GREY_LEVEL = 1.0 / 255.0 / LITE_STD[0]  # one 8-bit grey level after Lite0's [-1, 1] normalisation


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode (ReLU6, no stochastic depth)."""
    # drop_connect_rate 0: stochastic depth off, so fine-tuning students see the teacher's graph
    return _lite0(pretrained=True, drop_connect_rate=0.0)


def lite0_images(n: int = 96, size: int = 224, seed: int = 0) -> torch.Tensor:
    """`bundled_images` re-normalised from ImageNet mean/std to Lite0's [-1, 1] input range."""
    x = bundled_images(n, size, seed)
    im_mean, im_std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    lite_mean, lite_std = torch.tensor(LITE_MEAN).view(1, 3, 1, 1), torch.tensor(LITE_STD).view(1, 3, 1, 1)
    return ((x * im_std + im_mean) - lite_mean) / lite_std
