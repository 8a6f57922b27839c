"""BatchNorm re-estimation: recompute running statistics of a pruned model on calibration images.

Removing channels changes the distribution every later BatchNorm sees, while its running mean and
variance still describe the unpruned network; on compact pretrained models (depthwise-separable
nets) that mismatch alone can drop agreement to almost zero. Re-estimating the statistics needs no
labels and no gradient: reset them, run forward passes in train mode with cumulative averaging
(momentum None), and keep every other module (dropout, stochastic depth) in eval mode.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute every BatchNorm's running stats from `batches`; returns the number of images used.

    The model is left in eval mode. A model without BatchNorm is untouched (returns 0).
    """
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    it = iter(batches)
    first = next(it, None)
    if not bns or first is None:
        return 0  # nothing to re-estimate, or no images: keep the old statistics rather than zeros
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
        m.train()
    seen = 0
    try:
        for x in itertools.chain([first], it):
            model(x)
            seen += int(x.shape[0])
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()
    return seen
