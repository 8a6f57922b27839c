"""`torchvision:NAME`: a torchvision classification model with random weights (no hub access)."""

from __future__ import annotations

from typing import Any

from pipeline.errors import BadInput
from pipeline.sources.registry import BuildContext, model_source
from pipeline.sources.suggest import suggest


@model_source("torchvision", "torchvision:NAME")
def build(name: str, kwargs: dict[str, Any], ctx: BuildContext) -> Any:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise BadInput(f"model 'torchvision:{name}' does not exist{suggest(name, names)}")
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except TypeError as exc:
        raise BadInput(f"model 'torchvision:{name}': bad kwargs {kwargs}: {exc}") from None
