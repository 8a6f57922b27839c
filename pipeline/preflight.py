"""`fmap validate --build`: what `fmap run` does before its first stage, without running a stage.

Builds the model (so a module that does not import, a missing factory or a bad file fails here),
checks the stages fit it, builds every data split and runs the model on one batch of each, so a
shape or channel mismatch shows up in seconds instead of after the first stages of a run.
"""

from __future__ import annotations

from pipeline.errors import BadInput
from pipeline.recipe import Recipe


def preflight(recipe: Recipe) -> list[str]:
    """Lines describing what was checked; BadInput on the first problem."""
    import torch

    from pipeline.sources.capabilities import check_stages
    from pipeline.sources.data import build_bundle
    from pipeline.sources.models import build_model, default_input_shape

    base_dir = recipe.source_path.parent if recipe.source_path else None
    model = build_model(recipe.model, base_dir=base_dir)
    shape = default_input_shape(recipe.model, base_dir)
    check_stages(recipe, model)
    check_stage_settings(recipe, model)
    lines = [f"model {recipe.model.source}: built ({type(model).__name__}), input {shape}"]
    _run(model, torch.randn(shape), recipe.model.source, "an example input")
    bundle = build_bundle(recipe.data, shape, seed=recipe.seed)
    for name in ("calibration", "eval", "train"):
        split = getattr(bundle, name)
        if split is None:
            continue
        x, y = split.first_batch()
        out = _run(model, x, recipe.model.source, f"the first batch of data.{name}")
        labels = "labelled" if split.has_labels else "unlabelled"
        if y is not None and out.ndim == 2 and int(y.max()) >= out.shape[1]:
            raise BadInput(f"data.{name}: label {int(y.max())} but the model has {out.shape[1]} outputs")
        lines.append(f"data.{name}: {len(split)} samples, {labels}, batch {list(x.shape)} -> output {list(out.shape)}")
    return lines


def check_stage_settings(recipe: Recipe, model: object) -> None:
    """BadInput on the first name a stage's settings give that the built model lacks (Stage.check_model):
    the runner calls this before its first stage, so a misspelt layer fails before any work."""
    from pipeline.stages import get_stage

    for spec in recipe.stages:
        get_stage(spec.kind)().check_model(spec.config, model)


def _run(model, x, source: str, what: str):
    import torch

    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise BadInput(f"model '{source}' fails on {what} of shape {list(x.shape)}: {type(exc).__name__}: "
                       f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    return out[0] if isinstance(out, (tuple, list)) else out
