"""`builtin:NAME`: the embedded default models, trained and cached on first use unless weights are given."""

from __future__ import annotations

from typing import Any

from pipeline.errors import BadInput
from pipeline.sources.registry import BuildContext, model_source
from pipeline.sources.suggest import suggest


def input_shape(name: str, kwargs: dict[str, Any], ctx: BuildContext) -> list[int] | None:
    from pipeline.sources.builtin import BUILTIN_MODELS

    return list(BUILTIN_MODELS[name][1]) if name in BUILTIN_MODELS else None


@model_source("builtin", "builtin:NAME", input_shape=input_shape)
def build(name: str, kwargs: dict[str, Any], ctx: BuildContext) -> Any:
    from pipeline.sources.builtin import BUILTIN_MODELS

    if name not in BUILTIN_MODELS:
        raise BadInput(f"model 'builtin:{name}' does not exist{suggest(name, list(BUILTIN_MODELS))}")
    factory, _ = BUILTIN_MODELS[name]
    try:
        return factory(not ctx.has_weights, ctx.log, **kwargs)
    except TypeError as exc:
        raise BadInput(f"model 'builtin:{name}': bad kwargs {kwargs}: {exc}") from None
