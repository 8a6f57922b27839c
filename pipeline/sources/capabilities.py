"""Which stages a model can go through, checked before the first stage runs (and by `validate --build`).

Prune edits torch modules (torch-pruning's dependency graph); a TorchScript, torch.export or ONNX
graph has no such modules. Refusing up front beats failing after minutes of earlier stages.
(Visualize works on graphs: feature maps from the ONNX graph's Conv outputs, no Grad-CAM.)
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import BadInput
from pipeline.sources.registry import get_source, is_editable

NEEDS_MODULES = {
    "prune": "prune edits the model's nn.Conv2d/nn.Linear modules with torch-pruning",
}


def check_stages(recipe: Any, model: Any) -> None:
    """BadInput naming the first stage the model cannot go through, and why."""
    if is_editable(model):
        return
    source, _ = get_source(recipe.model.source)
    for spec in recipe.stages:
        why = NEEDS_MODULES.get(spec.kind)
        if why:
            raise BadInput(f"stage '{spec.id}' needs a torch model with its layers as modules, but "
                           f"'{recipe.model.source}' is a {source.kind} ({why}); use the model's Python source "
                           f"(python:file.py:factory with weights) or remove the stage")
