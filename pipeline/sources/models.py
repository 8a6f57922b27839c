"""Build a torch model from a recipe's `model:` section, with clear errors for every way it fails.

Sources are registered in pipeline/sources/registry.py, one `from_<prefix>.py` module each:
`torchvision:NAME`, `builtin:NAME`, `python:package.module:factory` or `python:path/file.py:factory`,
`timm:NAME`, `onnx:PATH`, `torchscript:PATH` and `exported:PATH` (docs/recipe.md).
Weights: a local state_dict loaded with `weights_only=True`, or a checkpoint written by fmap's prune
stage (architecture spec + state_dict), which resizes the base model's layers before loading.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import BadInput
from pipeline.recipe_models import ModelConfig

DEFAULT_INPUT_SHAPE = [1, 3, 224, 224]


def model_config_from_string(spec: str, input_shape: list[int] | None = None, weights: str | None = None,
                             allow_pickle: bool = False) -> ModelConfig:
    """Turn a command-line model spec (`torchvision:resnet18`) into a validated ModelConfig."""
    from pydantic import ValidationError

    from pipeline.sources.registry import spec_from_path

    spec = spec_from_path(spec)
    try:
        return ModelConfig(source=spec, input_shape=input_shape, weights=weights, allow_pickle=allow_pickle)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise BadInput(f"model '{spec}': {err['msg'].removeprefix('Value error, ')}") from None


def parse_shape(text: str) -> list[int]:
    """'1,3,224,224' or '1x3x224x224' -> [1, 3, 224, 224]."""
    try:
        dims = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise BadInput(f"input shape '{text}': expected comma-separated ints such as 1,3,224,224") from None
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise BadInput(f"input shape '{text}': expected positive ints such as 1,3,224,224")
    return dims


def default_input_shape(cfg: ModelConfig, base_dir: Path | None = None) -> list[int]:
    """The recipe's input_shape, else what the source knows (builtin, timm config, ONNX input), else 224."""
    if cfg.input_shape:
        return list(cfg.input_shape)
    from pipeline.sources.registry import BuildContext, get_source

    source, rest = get_source(cfg.source)
    if source.input_shape is not None:
        shape = source.input_shape(rest, dict(cfg.kwargs), BuildContext(base_dir=base_dir))
        if shape:
            return shape
    return list(DEFAULT_INPUT_SHAPE)


def build_model(cfg: ModelConfig, log: Callable[[str], None] | None = None, base_dir: Path | None = None) -> Any:
    """Return the model in eval mode on the CPU. Raises BadInput for anything the user can fix.

    `base_dir` is the recipe's directory: relative model paths and modules resolve there too.
    """
    from pipeline.sources.registry import BuildContext, get_source

    source, rest = get_source(cfg.source)
    ctx = BuildContext(base_dir=base_dir, log=log, has_weights=cfg.weights is not None)
    model = source.build(rest, dict(cfg.kwargs), ctx)
    if cfg.weights is not None:
        if not source.editable:
            raise BadInput(f"model '{cfg.source}': model.weights does not apply to a {source.kind} "
                           "(its weights are inside the file)")
        model = load_weights(model, str(ctx.resolve(cfg.weights)), allow_pickle=cfg.allow_pickle)
    try:
        return model.eval()
    except NotImplementedError:  # torch.export's module(): eval() is not supported, it has no train mode
        return model


def load_weights(model: Any, weights: str, allow_pickle: bool = False) -> Any:
    """Load a local state_dict or fmap checkpoint into `model`; pickle only if explicitly allowed."""
    import pickle

    import torch

    path = Path(weights)
    if path.is_dir():
        raise BadInput(f"weights file '{weights}' is a folder, expected a state_dict file")
    if not path.is_file():
        raise BadInput(f"weights file '{weights}' does not exist")
    if path.stat().st_size == 0:
        raise BadInput(f"weights file '{weights}' is empty")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        import zipfile

        if not zipfile.is_zipfile(path):
            raise BadInput(f"weights file '{weights}' is not a torch checkpoint (not a torch.save archive)") from None
        lines = [ln.strip() for ln in str(exc).splitlines() if "Unpickler error" in ln]
        why = lines[0][:160] if lines else "it contains pickled Python objects"
        raise BadInput(f"weights file '{weights}' cannot be loaded with weights_only=True ({why}); "
                       "set model.allow_pickle: true only if you trust the file") from None
    except Exception as exc:
        raise BadInput(f"weights file '{weights}' is not a torch checkpoint: {type(exc).__name__}: {str(exc)[:160]}") from None
    if isinstance(obj, torch.nn.Module):  # only reachable with allow_pickle
        return obj
    if isinstance(obj, dict) and obj.get("fmap_format"):
        from pipeline.pruning.checkpoint import load_checkpoint

        return load_checkpoint(path, model)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise BadInput(f"weights file '{weights}' holds a {type(obj).__name__}, expected a state_dict")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    try:
        model.load_state_dict(obj, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise BadInput(f"weights file '{weights}' does not match the model: {detail[:200]}") from None
    return model
