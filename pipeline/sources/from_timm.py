"""`timm:NAME`: a model from the installed timm package (`pip install 'fmap[timm]'`), random weights.

Pretrained weights would come from the Hugging Face hub; fmap never downloads, so give a local
state_dict as `model.weights`. The input shape defaults to the model's pretrained config.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import BadInput
from pipeline.sources.registry import BuildContext, model_source
from pipeline.sources.suggest import suggest


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise BadInput("model source 'timm:' needs the timm package: pip install 'fmap[timm]'") from None
    return timm


def _known(name: str) -> None:
    timm = _timm()
    if not timm.is_model(name):
        raise BadInput(f"model 'timm:{name}' does not exist in timm {timm.__version__}"
                       f"{suggest(name, timm.list_models())}")


def input_shape(name: str, kwargs: dict[str, Any], ctx: BuildContext) -> list[int] | None:
    _known(name)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    if "in_chans" in kwargs and size:
        size = (int(kwargs["in_chans"]), *size[1:])
    return [1, *map(int, size)] if size else None


@model_source("timm", "timm:NAME", input_shape=input_shape, kind="timm model")
def build(name: str, kwargs: dict[str, Any], ctx: BuildContext) -> Any:
    _known(name)
    if kwargs.get("pretrained"):
        raise BadInput(f"model 'timm:{name}': pretrained weights need the hub; download them yourself and "
                       "set model.weights to the local file")
    try:
        return _timm().create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise BadInput(f"model 'timm:{name}': bad kwargs {kwargs}: {exc}") from None
