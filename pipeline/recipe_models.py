"""Top-level recipe schema: model, data, run settings. Stage configs live with their stages.

Every model forbids unknown keys, so a misspelled key is an error naming it rather than a silent
default (the timm/argparse trap the style guide warns about).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
        if v is not None and (len(v) < 2 or any(d <= 0 for d in v)):
            raise ValueError("expected a list of positive ints such as [1, 3, 224, 224]")
        return v


class _DataCommon(Strict):
    samples: int | None = Field(default=None, gt=0)  # cap on samples taken from the source
    batch_size: int = Field(default=32, gt=0)


class BuiltinData(_DataCommon):
    """A dataset that ships with an installed package (offline), split with a fixed seed."""

    source: Literal["builtin"]
    name: Literal["digits"] = "digits"
    split: Literal["train", "calibration", "test"] = "test"


class ImageFolderData(_DataCommon):
    """A local folder of class subfolders of images (torchvision ImageFolder layout)."""

    source: Literal["imagefolder"]
    path: str
    transform: Literal["imagenet", "none"] = "imagenet"
    size: int | None = Field(default=None, gt=0)  # final square size; imagenet default 224
    mean: list[float] | None = None
    std: list[float] | None = None


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
    samples: int | None = Field(default=64, gt=0)
    shape: list[int] | None = None  # CHW; defaults to the model's input shape


DataSource = Annotated[BuiltinData | ImageFolderData | NumpyData | RandomData, Field(discriminator="source")]


class DataConfig(Strict):
    calibration: DataSource | None = None
    eval: DataSource | None = None
    train: DataSource | None = None
