"""Data splits as the stages see them: an iterable of (x, y) batches, streamed, never all in memory.

`x` is a float32 NCHW tensor already transformed for the model; `y` is an int64 label tensor or
None when the data has no labels (agreement-only verification).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class ImageFolderSplit(DataSplit):
    """Class-subfolder images read lazily, one batch at a time (bounded memory at any size)."""

    def __init__(self, name: str, files: list[tuple[str, int]], transform, batch_size: int, num_classes: int,
                 channels: int) -> None:
        self.name = name
        self.files = files
        self.transform = transform
        self.batch_size = batch_size
        self.num_samples = len(files)
        self.has_labels = True
        self.num_classes = num_classes
        self.channels = channels

    def batches(self, batch_size: int | None = None) -> Iterator[Batch]:
        from PIL import Image

        bs = batch_size or self.batch_size
        for i in range(0, self.num_samples, bs):
            chunk = self.files[i:i + bs]
            imgs = []
            for path, _ in chunk:
                with Image.open(path) as im:
                    imgs.append(self.transform(im.convert("L" if self.channels == 1 else "RGB")))
            yield torch.stack(imgs), torch.tensor([label for _, label in chunk], dtype=torch.int64)


class RandomSplit(DataSplit):
    """Seeded random inputs, regenerated per batch: for latency-only runs, no labels."""

    def __init__(self, name: str, shape: list[int], samples: int, batch_size: int, seed: int = 0) -> None:
        self.name = name
        self.shape = list(shape)
        self.num_samples = samples
        self.batch_size = batch_size
        self.seed = seed

    def batches(self, batch_size: int | None = None) -> Iterator[Batch]:
        bs = batch_size or self.batch_size
        gen = torch.Generator().manual_seed(self.seed)
        for i in range(0, self.num_samples, bs):
            n = min(bs, self.num_samples - i)
            yield torch.randn([n, *self.shape], generator=gen), None


def build_split(cfg, name: str, input_shape: list[int], seed: int = 0) -> DataSplit:
    """Build one split from its recipe config. Raises BadInput for missing/invalid files."""
    from pipeline.errors import BadInput

    source = cfg.source
    if source == "builtin" and cfg.name == "photos":
        from pipeline.sources.photos import photo_split

        size = input_shape[-1] if len(input_shape) == 4 else 224
        return TensorSplit(name, photo_split(cfg.split, cfg.samples or 128, size), None, batch_size=cfg.batch_size)
    if source == "builtin":
        from pipeline.sources.builtin import digits_splits

        x, y = digits_splits()[cfg.split]
        if cfg.samples:
            x, y = x[:cfg.samples], y[:cfg.samples]
        return TensorSplit(name, x, y, batch_size=cfg.batch_size, num_classes=10)
    if source == "random":
        shape = cfg.shape or list(input_shape[1:])
        return RandomSplit(name, shape, cfg.samples or 64, cfg.batch_size, seed=seed)
    if source == "numpy":
        return _numpy_split(cfg, name, input_shape)
    if source == "imagefolder":
        return _imagefolder_split(cfg, name, input_shape, seed)
    raise BadInput(f"data.{name}.source: unknown source '{source}'")  # pragma: no cover - schema forbids


def _numpy_split(cfg, name: str, input_shape: list[int]) -> TensorSplit:
    import zipfile

    import numpy as np

    from pipeline.errors import BadInput

    path = Path(cfg.path)
    if not path.is_file():
        raise BadInput(f"data.{name}.path: file '{cfg.path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if cfg.x_key not in npz.files:
                raise BadInput(f"data.{name}: '{cfg.path}' has no array '{cfg.x_key}' (it has {', '.join(npz.files)})")
            x = npz[cfg.x_key]
            y = npz[cfg.y_key] if cfg.y_key and cfg.y_key in npz.files else None
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise BadInput(f"data.{name}.path: '{cfg.path}' is not a readable .npz file ({exc})") from None
    if cfg.samples:
        x = x[:cfg.samples]
        y = None if y is None else y[:cfg.samples]
    channels = input_shape[1] if len(input_shape) == 4 else None
    if x.ndim == 4 and channels is not None and x.shape[1] != channels and x.shape[-1] == channels:
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    tx = torch.from_numpy(np.ascontiguousarray(x))
    if tx.dtype == torch.uint8:
        tx = tx.float() / 255.0
    tx = tx.float()
    if cfg.mean is not None and cfg.std is not None:
        mean = torch.tensor(cfg.mean).view(1, -1, *([1] * (tx.ndim - 2)))
        std = torch.tensor(cfg.std).view(1, -1, *([1] * (tx.ndim - 2)))
        tx = (tx - mean) / std
    if list(tx.shape[1:]) != list(input_shape[1:]):
        raise BadInput(f"data.{name}: '{cfg.path}' samples have shape {list(tx.shape[1:])}, the model expects {input_shape[1:]}")
    ty = None if y is None else torch.from_numpy(np.asarray(y)).long()
    return TensorSplit(name, tx, ty, batch_size=cfg.batch_size)


def _imagefolder_split(cfg, name: str, input_shape: list[int], seed: int) -> ImageFolderSplit:
    import random

    from torchvision import transforms as T

    from pipeline.errors import BadInput

    root = Path(cfg.path)
    if not root.is_dir():
        raise BadInput(f"data.{name}.path: folder '{cfg.path}' does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise BadInput(f"data.{name}.path: '{cfg.path}' has no class subfolders (expected PATH/<class>/<image>)")
    files = [(str(f), idx) for idx, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
             if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise BadInput(f"data.{name}.path: no images under '{cfg.path}'")
    if cfg.split is not None:
        files = stratified_part(files, cfg.split, name, seed)
        if not files:
            raise BadInput(f"data.{name}.split: the {cfg.split[name]:g} fraction of '{cfg.path}' holds no images")
    random.Random(seed).shuffle(files)  # a capped sample should cover every class
    if cfg.samples:
        files = files[:cfg.samples]
    channels = input_shape[1] if len(input_shape) == 4 else 3
    size = cfg.size or (input_shape[-1] if len(input_shape) == 4 else 224)
    steps = []
    if cfg.transform == "imagenet":
        steps += [T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size)]
        default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ([0.5] * channels, [0.5] * channels)
        mean, std = cfg.mean or default_mean, cfg.std or default_std
    else:
        steps += [T.Resize((size, size))]
        mean, std = cfg.mean, cfg.std
    steps.append(T.ToTensor())
    if mean is not None and std is not None:
        steps.append(T.Normalize(mean, std))
    return ImageFolderSplit(name, files, T.Compose(steps), cfg.batch_size, len(classes), channels)


SPLIT_ORDER = ("calibration", "eval", "train")


def stratified_part(files: list[tuple[str, int]], fractions: dict[str, float], part: str,
                    seed: int) -> list[tuple[str, int]]:
    """The `part` share of every class, after a seeded shuffle per class: disjoint across parts.

    Parts are cut in a fixed order (calibration, eval, train) at rounded cumulative fractions, so
    the same fractions and seed always give the same files, and no file lands in two parts.
    """
    import random

    by_class: dict[int, list[tuple[str, int]]] = {}
    for item in sorted(files):
        by_class.setdefault(item[1], []).append(item)
    order = [p for p in SPLIT_ORDER if p in fractions]
    before = sum(fractions[p] for p in order[:order.index(part)])
    out: list[tuple[str, int]] = []
    for label, items in sorted(by_class.items()):
        random.Random(f"{seed}:{label}").shuffle(items)
        n = len(items)
        out += items[round(before * n):round((before + fractions[part]) * n)]
    return out


def build_bundle(data_cfg, input_shape: list[int], seed: int = 0) -> DataBundle:
    """Build every split the recipe defines."""
    return DataBundle(**{
        split: build_split(getattr(data_cfg, split), split, input_shape, seed)
        for split in ("calibration", "eval", "train") if getattr(data_cfg, split) is not None
    })
