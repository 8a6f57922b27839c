"""The stage registry: one Python dict, name -> "module:Class". Modules import lazily."""

from __future__ import annotations

import importlib

from pipeline.stages.base import Stage

STAGES: dict[str, str] = {
    "profile": "pipeline.stages.profile:ProfileStage",
    "prune": "pipeline.stages.prune:PruneStage",
    "export": "pipeline.stages.export:ExportStage",
    "quantize": "pipeline.stages.quantize:QuantizeStage",
    "tensorrt": "pipeline.stages.tensorrt:TensorRTStage",
    "verify": "pipeline.stages.verify:VerifyStage",
    "visualize": "pipeline.stages.visualize:VisualizeStage",
}


def get_stage(name: str) -> type[Stage]:
    """Import and return the stage class registered under `name` (KeyError if unknown)."""
    module_name, _, attr = STAGES[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)
