"""Label-free validation of a student against its teacher: agreement and KL on held-out images.

Fine-tuning a pruned model usually happens on unlabelled images, where accuracy cannot be
measured but agreement with the unpruned teacher (identical top-1 decisions) and the KL divergence
between their output distributions can. `Reference` holds a small held-out set with the
teacher's logits computed once; `score` evaluates any candidate against it. Labels are used
(`val_acc`) when the held-out set has them.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.sources.data import DataSplit, ImageFolderSplit, TensorSplit

MAX_HOLDOUT = 512  # held-out samples kept in memory (with their teacher logits)


@dataclass
class Reference:
    """Held-out inputs, optional labels, and the teacher's logits on them."""

    x: torch.Tensor
    y: torch.Tensor | None
    teacher_logits: torch.Tensor
    source: str  # where the held-out images came from, for the report

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, split: DataSplit, source: str, limit: int = MAX_HOLDOUT,
              batch_size: int = 64) -> Reference:
        xs, ys, labelled = [], [], True
        n = 0
        for x, y in split.batches():
            xs.append(x)
            labelled = labelled and y is not None
            if y is not None:
                ys.append(y)
            n += len(x)
            if n >= limit:
                break
        x = torch.cat(xs)[:limit]
        y = torch.cat(ys)[:limit] if labelled and ys else None
        return cls(x, y, logits(teacher, x, batch_size), source)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def excluding(self, seen: torch.Tensor, what: str) -> Reference:
        """Without the samples equal to one of `seen` (images a recovery step fitted on, which would
        flatter the model it fitted); unchanged when nothing would be left."""
        fitted = {_digest(x) for x in seen}
        keep = [i for i, x in enumerate(self.x) if _digest(x) not in fitted]
        if len(keep) == len(self.x) or not keep:
            return self
        idx = torch.tensor(keep)
        return Reference(self.x[idx], None if self.y is None else self.y[idx], self.teacher_logits[idx],
                         f"{self.source}, {len(self.x) - len(keep)} of {what} left out")


def _digest(x: torch.Tensor) -> bytes:
    return hashlib.sha1(x.detach().contiguous().float().numpy().tobytes()).digest()


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Eval-mode logits of `model` on `x`, batched; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([_tensor(model(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def _tensor(out: object) -> torch.Tensor:
    from pipeline.pruning.engine import _first_tensor

    t = _first_tensor(out)
    if t is None:
        raise TypeError("the model does not return a logits tensor")
    return t.float()


@torch.no_grad()
def score(model: nn.Module, ref: Reference, batch_size: int = 64) -> dict[str, float | None]:
    """{agreement, kl, val_acc}: top-1 agreement with the teacher, mean KL(teacher || student), accuracy.

    `kl` is None when the student's outputs are not finite (a diverged fine-tune); its agreement is 0.
    """
    out = logits(model, ref.x, batch_size)
    agreement = float((out.argmax(1) == ref.teacher_logits.argmax(1)).float().mean())
    kl = float(F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref.teacher_logits, 1), log_target=True,
                        reduction="batchmean"))
    acc = None if ref.y is None else float((out.argmax(1) == ref.y).float().mean())
    if not math.isfinite(kl):
        agreement, kl = 0.0, math.inf  # a diverged student (NaN/inf logits) agrees with nothing
    return {"agreement": round(agreement, 6), "kl": round(kl, 6) if math.isfinite(kl) else None, "val_acc": None if acc is None else round(acc, 6)}


def split_holdout(split: DataSplit, fraction: float, seed: int = 0) -> tuple[DataSplit, DataSplit] | None:
    """(train part, held-out part) of a split, disjoint and seeded; None when the split type cannot be cut.

    The held-out part is `fraction` of the split (at least one sample, at most MAX_HOLDOUT), and at
    least one sample is left for training.
    """
    n = len(split)
    k = min(MAX_HOLDOUT, max(1, int(round(n * fraction))))
    if n < 2 or k >= n:
        return None
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held, kept = sorted(order[:k]), sorted(order[k:])
    if isinstance(split, TensorSplit):
        def part(idx: list[int], name: str) -> TensorSplit:
            t = torch.tensor(idx)
            return TensorSplit(name, split.x[t], None if split.y is None else split.y[t], split.batch_size,
                               split.num_classes)
        return part(kept, split.name), part(held, f"{split.name}-holdout")
    if isinstance(split, ImageFolderSplit):
        def folder(idx: list[int], name: str) -> ImageFolderSplit:
            sub = copy.copy(split)
            sub.name, sub.files, sub.num_samples = name, [split.files[i] for i in idx], len(idx)
            return sub
        return folder(kept, split.name), folder(held, f"{split.name}-holdout")
    return None
