"""Top-level recipe schema: model, data, run settings. Stage configs live with their stages.

Every model forbids unknown keys, so a misspelled key is an error naming it rather than a silent
default (the timm/argparse trap the style guide warns about).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


MAX_INPUT_ELEMENTS = 2**28  # one example batch of input_shape: 1 GiB of float32
MAX_DIM = 65536


class Strict(BaseModel):
    # NaN/Inf are never meaningful recipe values (`lr: .inf` trained a model to 9%)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def check_shape(v: list[int] | None, what: str, min_len: int) -> list[int] | None:
    """Positive dims, each at most MAX_DIM, at most MAX_INPUT_ELEMENTS in all: checked at validate
    time, so a typo like [1, 1, 100000, 100000] is one line, not an allocation failure mid-run."""
    if v is None:
        return v
    if len(v) < min_len or any(d <= 0 for d in v):
        raise ValueError(f"expected a list of positive ints such as {what}")
    if any(d > MAX_DIM for d in v):
        raise ValueError(f"every dimension must be at most {MAX_DIM}")
    total = 1
    for d in v:
        total *= d
    if total > MAX_INPUT_ELEMENTS:
        raise ValueError(f"at most {MAX_INPUT_ELEMENTS:,} values in all ({total:,} given)")
    return v


def check_std(v: list[float] | None) -> list[float] | None:
    if v is not None and any(x <= 0 for x in v):
        raise ValueError("every std must be positive (inputs are divided by it)")
    return v


class ModelConfig(Strict):
    """Where the model comes from. `source` is `prefix:rest` of a registered source
    (pipeline/sources/registry.py); `weights` is a local state_dict or an fmap checkpoint."""

    source: str
    weights: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    input_shape: list[int] | None = None  # NCHW; defaults to the builtin's or [1, 3, 224, 224]
    allow_pickle: bool = False  # only then may torch.load unpickle arbitrary objects

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str) -> str:
        from pipeline.sources.registry import check_spec

        problem = check_spec(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("input_shape")
    @classmethod
    def _check_shape(cls, v: list[int] | None) -> list[int] | None:
        return check_shape(v, "[1, 3, 224, 224]", 2)


class _DataCommon(Strict):
    samples: int | None = Field(default=None, gt=0, le=100_000_000)  # cap on samples taken from the source
    batch_size: int = Field(default=32, gt=0, le=65536)

    @field_validator("std", check_fields=False)
    @classmethod
    def _std(cls, v: list[float] | None) -> list[float] | None:
        return check_std(v)


class BuiltinData(_DataCommon):
    """A dataset that ships with an installed package (offline), split with a fixed seed: `digits`
    (scikit-learn's labelled scans) or `photos` (unlabelled crops of the photos inside scikit-learn
    and scikit-image, for ImageNet models; `samples` crops, default 128)."""

    source: Literal["builtin"]
    name: Literal["digits", "photos"] = "digits"
    split: Literal["train", "calibration", "test"] = "test"
    mean: list[float] | None = None  # photos only: per-channel normalisation (default ImageNet's)
    std: list[float] | None = None

    @model_validator(mode="after")
    def _norm_for_photos(self) -> BuiltinData:
        if (self.mean is not None or self.std is not None) and self.name != "photos":
            raise ValueError("mean/std apply to name: photos only (digits are normalised by the builtin model)")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None and (len(v) != 3 or (key == "std" and min(v) <= 0)):
                raise ValueError(f"{key}: expected 3 numbers{' > 0' if key == 'std' else ''}, one per RGB channel")
        return self


class ImageFolderData(_DataCommon):
    """A local folder of class subfolders of images (torchvision ImageFolder layout)."""

    source: Literal["imagefolder"]
    path: str
    transform: Literal["imagenet", "none"] = "imagenet"
    size: int | None = Field(default=None, gt=0, le=8192)  # final square size; imagenet default 224
    mean: list[float] | None = None
    std: list[float] | None = None
    # One labelled folder shared by several splits: fractions per split name, e.g.
    # {calibration: 0.2, eval: 0.4, train: 0.4}. Each data split takes the part named after itself;
    # parts are disjoint, stratified per class and drawn with the recipe's seed.
    split: dict[Literal["calibration", "eval", "train"], float] | None = None

    @field_validator("split")
    @classmethod
    def _check_fractions(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if not v or any(not 0 < f <= 1 for f in v.values()):
            raise ValueError("expected fractions in (0, 1] per split, e.g. {calibration: 0.2, eval: 0.4, train: 0.4}")
        if sum(v.values()) > 1 + 1e-9:
            raise ValueError(f"split fractions add up to {sum(v.values()):.3g}, more than 1")
        return v


class NumpyData(_DataCommon):
    """An .npz file with arrays x (NCHW or NHWC float/uint8) and optionally y (int labels)."""

    source: Literal["numpy"]
    path: str
    x_key: str = "x"
    y_key: str | None = "y"
    mean: list[float] | None = None
    std: list[float] | None = None


class RandomData(_DataCommon):
    """Random inputs of the model's input shape: for latency-only runs. No labels."""

    source: Literal["random"]
    samples: int | None = Field(default=64, gt=0, le=1_000_000)
    shape: list[int] | None = None  # CHW; defaults to the model's input shape

    @field_validator("shape")
    @classmethod
    def _check_shape(cls, v: list[int] | None) -> list[int] | None:
        return check_shape(v, "[3, 224, 224]", 1)


DataSource = Annotated[BuiltinData | ImageFolderData | NumpyData | RandomData, Field(discriminator="source")]


class DataConfig(Strict):
    calibration: DataSource | None = None
    eval: DataSource | None = None
    train: DataSource | None = None

    @model_validator(mode="after")
    def _no_overlap(self) -> DataConfig:
        """Two splits reading one folder must divide it with the same `split:` fractions."""
        from pathlib import Path

        seen: dict[str, tuple[str, ImageFolderData]] = {}
        for name in ("calibration", "eval", "train"):
            cfg = getattr(self, name)
            if not isinstance(cfg, ImageFolderData):
                continue
            if cfg.split is not None and name not in cfg.split:
                raise ValueError(f"{name}.split has no '{name}' fraction (it has {', '.join(cfg.split)})")
            key = str(Path(cfg.path).expanduser().resolve())
            if key in seen:
                other, prev = seen[key]
                if cfg.split is None or prev.split is None:
                    raise ValueError(f"{other} and {name} read the same folder '{cfg.path}' and would "
                                     f"overlap; divide it with split: {{{other}: 0.3, {name}: 0.7}} on both")
                if cfg.split != prev.split:
                    raise ValueError(f"{other} and {name} divide '{cfg.path}' with different split "
                                     "fractions; give both the same split: mapping")
            else:
                seen[key] = (name, cfg)
        return self
