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

    def take(self, n: int | None, batch_size: int | None = None) -> Iterator[Batch]:
        """The batches of the first `n` samples (the last one cut short); all of them for None."""
        seen = 0
        for x, y in self.batches(batch_size):
            if n is not None:
                if seen >= n:
                    return
                x, y = x[: n - seen], None if y is None else y[: n - seen]
            seen += len(x)
            yield x, y


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
    """Class-subfolder images read lazily, one batch at a time (bounded memory at any size).

    A folder of images with no class subfolders is an unlabelled split (y is None): enough for
    calibration, agreement and distillation, which need no labels.
    """

    def __init__(self, name: str, files: list[tuple[str, int]], transform, batch_size: int, num_classes: int,
                 channels: int, labelled: bool = True) -> None:
        self.name = name
        self.files = files
        self.transform = transform
        self.batch_size = batch_size
        self.num_samples = len(files)
        self.has_labels = labelled
        self.num_classes = num_classes if labelled else None
        self.channels = channels

    def batches(self, batch_size: int | None = None) -> Iterator[Batch]:
        from PIL import Image

        bs = batch_size or self.batch_size
        for i in range(0, self.num_samples, bs):
            chunk = self.files[i:i + bs]
            imgs = []
            for path, _ in chunk:
                imgs.append(self._load(Image, path))
            labels = torch.tensor([label for _, label in chunk], dtype=torch.int64) if self.has_labels else None
            yield torch.stack(imgs), labels

    def _load(self, image_module, path: str) -> torch.Tensor:
        """One image, transformed; an unreadable or truncated file is bad input naming the file."""
        from pipeline.errors import BadInput

        try:
            with image_module.open(path) as im:
                return self.transform(im.convert("L" if self.channels == 1 else "RGB"))
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for broken files
            why = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise BadInput(f"data.{self.name}: image '{path}' cannot be read: {why}") from None


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
        x = photo_split(cfg.split, cfg.samples or 128, size, mean=cfg.mean, std=cfg.std)
        return TensorSplit(name, x, None, batch_size=cfg.batch_size)
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
    if path.is_dir():
        raise BadInput(f"data.{name}.path: '{cfg.path}' is a folder, expected an .npz file "
                       "(use source: imagefolder for a folder of images)")
    if not path.is_file():
        raise BadInput(f"data.{name}.path: file '{cfg.path}' does not exist")
    if (cfg.mean is None) != (cfg.std is None):
        raise BadInput(f"data.{name}: give both mean and std (or neither) for numpy data")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(6)
        what = "a single .npy array" if head == b"\x93NUMPY" else ("empty" if not head else "no zip archive")
        raise BadInput(f"data.{name}.path: '{cfg.path}' is not a readable .npz file (it is {what}; expected "
                       f"arrays '{cfg.x_key}' and '{cfg.y_key}' saved with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise BadInput(f"data.{name}.path: '{cfg.path}' is a single .npy array, expected an .npz "
                               f"archive with arrays '{cfg.x_key}' and '{cfg.y_key}'")
            if cfg.x_key not in npz.files:
                raise BadInput(f"data.{name}: '{cfg.path}' has no array '{cfg.x_key}' "
                               f"(it has {', '.join(npz.files) or 'no arrays'})")
            x = npz[cfg.x_key]
            if cfg.y_key and cfg.y_key not in npz.files and "y_key" in cfg.model_fields_set:
                raise BadInput(f"data.{name}: '{cfg.path}' has no array '{cfg.y_key}' (data.{name}.y_key; "
                               f"it has {', '.join(npz.files)}); set y_key: null for unlabelled data")
            y = npz[cfg.y_key] if cfg.y_key and cfg.y_key in npz.files else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInput(f"data.{name}.path: '{cfg.path}' is not a readable .npz file ({str(exc)[:160]})") from None
    except TypeError:  # np.load returned a bare ndarray (.npy content), which is no context manager
        raise BadInput(f"data.{name}.path: '{cfg.path}' is a single .npy array, expected an .npz archive "
                       f"with arrays '{cfg.x_key}' and '{cfg.y_key}'") from None
    _check_arrays(x, y, name, cfg)
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
        _check_norm(cfg.mean, cfg.std, int(tx.shape[1]), name)
        mean = torch.tensor(cfg.mean).view(1, -1, *([1] * (tx.ndim - 2)))
        std = torch.tensor(cfg.std).view(1, -1, *([1] * (tx.ndim - 2)))
        tx = (tx - mean) / std
    if list(tx.shape[1:]) != list(input_shape[1:]):
        raise BadInput(f"data.{name}: '{cfg.path}' samples have shape {list(tx.shape[1:])}, the model expects {input_shape[1:]}")
    ty = None if y is None else torch.from_numpy(np.asarray(y)).long()
    return TensorSplit(name, tx, ty, batch_size=cfg.batch_size)


def _check_norm(mean: list[float], std: list[float], channels: int, name: str) -> None:
    """mean/std hold one value per channel (or one for all)."""
    from pipeline.errors import BadInput

    for key, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise BadInput(f"data.{name}.{key}: {len(values)} values for {channels}-channel inputs "
                           f"(expected 1 or {channels})")


def _check_arrays(x, y, name: str, cfg) -> None:
    """Shape, dtype, length and finiteness of an .npz's arrays, each failure one line."""
    import numpy as np

    from pipeline.errors import BadInput

    where = f"data.{name}: '{cfg.path}'"
    if x.dtype.kind not in "biuf":
        raise BadInput(f"{where} array '{cfg.x_key}' has dtype {x.dtype}, expected numbers (float or uint8)")
    if x.ndim < 2:
        raise BadInput(f"{where} array '{cfg.x_key}' has shape {list(x.shape)}, expected (N, C, H, W) or (N, H, W, C)")
    if x.shape[0] == 0:
        raise BadInput(f"{where} array '{cfg.x_key}' holds no samples")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise BadInput(f"{where} array '{cfg.x_key}' has {int((~np.isfinite(x)).sum())} NaN/Inf value(s)")
    if y is None:
        return
    if y.ndim != 1:
        raise BadInput(f"{where} labels '{cfg.y_key}' have shape {list(y.shape)}, expected one int per sample")
    if y.dtype.kind not in "biu":
        if y.dtype.kind != "f" or not np.isfinite(y).all() or not np.all(y == np.round(y)):
            raise BadInput(f"{where} labels '{cfg.y_key}' have dtype {y.dtype}, expected integer class indices")
    if len(y) != len(x):
        raise BadInput(f"{where} has {len(x)} samples in '{cfg.x_key}' but {len(y)} labels in '{cfg.y_key}'")
    if len(y) and int(y.min()) < 0:
        raise BadInput(f"{where} labels '{cfg.y_key}' include {int(y.min())}; class indices start at 0")


def _imagefolder_split(cfg, name: str, input_shape: list[int], seed: int) -> ImageFolderSplit:
    import random

    from torchvision import transforms as T

    from pipeline.errors import BadInput

    root = Path(cfg.path)
    if root.is_file():
        raise BadInput(f"data.{name}.path: '{cfg.path}' is a file, expected a folder of class subfolders "
                       "(use source: numpy for an .npz file)")
    if not root.is_dir():
        raise BadInput(f"data.{name}.path: folder '{cfg.path}' does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    flat = [(str(f), -1) for f in sorted(root.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if not classes and not flat:
        raise BadInput(f"data.{name}.path: '{cfg.path}' has no images and no class subfolders "
                       "(expected PATH/<class>/<image>, or PATH/<image> for unlabelled images)")
    labelled = bool(classes)
    files = flat if not labelled else [(str(f), idx) for idx, c in enumerate(classes)
                                       for f in sorted((root / c).rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS]
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
        _check_norm(mean, std, channels, name)
        steps.append(T.Normalize(mean, std))
    return ImageFolderSplit(name, files, T.Compose(steps), cfg.batch_size, len(classes), channels, labelled)


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
