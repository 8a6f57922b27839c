"""Per-channel activation statistics (the profile stage writes them, the prune stage ranks by them).

Data containers live here; the streaming collector that fills them is `collect_channel_stats`.
Keys are module names of Conv2d/Linear layers (as in `model.named_modules()`); each array has one
entry per output channel of that layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class LayerStats:
    mean_abs: np.ndarray  # [C] mean |activation| per channel
    apoz: np.ndarray  # [C] average percentage of zeros, measured after the following ReLU-like op
    variance: np.ndarray  # [C]
    dead: np.ndarray  # [C] bool: always zero or constant over every sample seen
    samples: int  # number of input samples seen
    mean_rank: np.ndarray | None = None  # [C] HRank-style average feature-map rank (subsample)
    corr: np.ndarray | None = None  # [C, C] inter-channel Pearson correlation
    num_high_corr_pairs: int = 0  # channel pairs with |r| > 0.95
    measured_at: str = ""  # the module/op whose output was measured (e.g. the ReLU after the conv)


@dataclass
class ChannelStats:
    layers: dict[str, LayerStats] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:  # implemented by the profiler (npz, atomic)
        raise NotImplementedError

    @classmethod
    def load(cls, path: str | Path) -> ChannelStats:  # implemented by the profiler
        raise NotImplementedError
