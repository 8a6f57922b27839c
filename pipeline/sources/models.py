"""Build a torch model from a recipe's `model:` section, with clear errors for every way it fails.

Sources: `torchvision:NAME` (random weights unless a local weights file is given: no hub access),
`builtin:NAME` (the embedded default, trained and cached on first use), and
`python:package.module:factory` (any importable callable returning an nn.Module).
Weights: a local state_dict loaded with `weights_only=True`, or a checkpoint written by fmap's prune
stage (architecture spec + state_dict), which resizes the base model's layers before loading.
"""

from __future__ import annotations

import difflib
import importlib
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


def default_input_shape(cfg: ModelConfig) -> list[int]:
    if cfg.input_shape:
        return list(cfg.input_shape)
    prefix, _, name = cfg.source.partition(":")
    if prefix == "builtin":
        from pipeline.sources.builtin import BUILTIN_MODELS

        if name in BUILTIN_MODELS:
            return list(BUILTIN_MODELS[name][1])
    return list(DEFAULT_INPUT_SHAPE)


def build_model(cfg: ModelConfig, log: Callable[[str], None] | None = None) -> Any:
    """Return the model in eval mode on the CPU. Raises BadInput for anything the user can fix."""
    prefix, _, name = cfg.source.partition(":")
    pretrained_builtin = prefix == "builtin" and cfg.weights is None
    if prefix == "torchvision":
        model = _torchvision(name, cfg.kwargs)
    elif prefix == "builtin":
        model = _builtin(name, pretrained_builtin, cfg.kwargs, log)
    else:
        model = _python_factory(name, cfg.kwargs)
    if cfg.weights is not None:
        model = load_weights(model, cfg.weights, allow_pickle=cfg.allow_pickle)
    return model.eval()


def _torchvision(name: str, kwargs: dict[str, Any]) -> Any:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise BadInput(f"model 'torchvision:{name}' does not exist{_suggest(name, names)}")
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except TypeError as exc:
        raise BadInput(f"model 'torchvision:{name}': bad kwargs {kwargs}: {exc}") from None


def _builtin(name: str, pretrained: bool, kwargs: dict[str, Any], log: Callable[[str], None] | None) -> Any:
    from pipeline.sources.builtin import BUILTIN_MODELS

    if name not in BUILTIN_MODELS:
        raise BadInput(f"model 'builtin:{name}' does not exist{_suggest(name, list(BUILTIN_MODELS))}")
    factory, _ = BUILTIN_MODELS[name]
    try:
        return factory(pretrained, log, **kwargs)
    except TypeError as exc:
        raise BadInput(f"model 'builtin:{name}': bad kwargs {kwargs}: {exc}") from None


def _python_factory(target: str, kwargs: dict[str, Any]) -> Any:
    import torch

    module_name, _, attr = target.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BadInput(f"model 'python:{target}': cannot import module '{module_name}': {exc}") from None
    except SyntaxError as exc:
        where = f"{exc.filename}:{exc.lineno}" if exc.filename else module_name
        raise BadInput(f"model 'python:{target}': syntax error in {where}: {exc.msg}") from None
    except SystemExit as exc:  # user code must not pick fmap's exit code
        raise BadInput(f"model 'python:{target}': importing '{module_name}' called sys.exit({exc.code!r})") from None
    except Exception as exc:  # the user's module raised while importing
        raise BadInput(f"model 'python:{target}': importing '{module_name}' failed: "
                       f"{type(exc).__name__}: {_first_line(exc)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise BadInput(f"model 'python:{target}': module '{module_name}' has no callable '{attr}'")
    try:
        model = factory(**kwargs)
    except SystemExit as exc:
        raise BadInput(f"model 'python:{target}': the factory called sys.exit({exc.code!r})") from None
    except Exception as exc:  # the user's code: report it as bad input, one line
        raise BadInput(f"model 'python:{target}' failed to build: {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"model 'python:{target}' returned {type(model).__name__}, expected a torch.nn.Module")
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


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""
