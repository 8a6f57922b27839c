"""Data splits as the stages see them: an iterable of (x, y) batches, streamed, never all in memory.

`x` is a float32 NCHW tensor already transformed for the model; `y` is an int64 label tensor or
None when the data has no labels (agreement-only verification).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

Batch = tuple[torch.Tensor, "torch.Tensor | None"]


class DataSplit:
    """Base class of a split. Subclasses implement `batches`."""

    name: str = "split"
    num_samples: int = 0
    batch_size: int = 32
    has_labels: bool = False
    num_classes: int | None = None

    def batches(self, batch_size: int | None = None) -> Iterator[Batch]:  # pragma: no cover
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_samples

    def first_batch(self, batch_size: int | None = None) -> Batch:
        return next(iter(self.batches(batch_size)))


class TensorSplit(DataSplit):
    """A split held as tensors (builtin and .npz data, which are small by construction)."""

    def __init__(self, name: str, x: torch.Tensor, y: torch.Tensor | None, batch_size: int = 32,
                 num_classes: int | None = None) -> None:
        self.name = name
        self.x = x.float()
        self.y = None if y is None else y.long()
        self.num_samples = int(x.shape[0])
        self.batch_size = batch_size
        self.has_labels = y is not None
        self.num_classes = num_classes if num_classes is not None else (
            int(self.y.max().item()) + 1 if self.y is not None and self.num_samples else None)

    def batches(self, batch_size: int | None = None) -> Iterator[Batch]:
        bs = batch_size or self.batch_size
        for i in range(0, self.num_samples, bs):
            yield self.x[i:i + bs], None if self.y is None else self.y[i:i + bs]


@dataclass
class DataBundle:
    """The recipe's data: any split may be None when the recipe does not define it."""

    calibration: DataSplit | None = None
    eval: DataSplit | None = None
    train: DataSplit | None = None

    def require(self, split: str, stage: str) -> DataSplit:
        from pipeline.errors import BadInput

        value = getattr(self, split)
        if value is None:
            raise BadInput(f"stage '{stage}' needs data.{split} in the recipe, but the recipe defines none")
        return value
