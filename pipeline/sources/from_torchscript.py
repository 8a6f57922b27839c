"""`torchscript:PATH`: a `torch.jit.save`d module. Runs, exports and quantizes like any model; its
layers are compiled, so profile reads an ONNX view of it and prune/visualize refuse with a reason."""

from __future__ import annotations

from typing import Any

from pipeline.errors import BadInput
from pipeline.sources.registry import BuildContext, model_source


@model_source("torchscript", "torchscript:PATH", editable=False, kind="TorchScript module")
def build(file: str, kwargs: dict[str, Any], ctx: BuildContext) -> Any:
    import torch

    path = ctx.resolve(file)
    if not path.is_file():
        raise BadInput(f"model 'torchscript:{file}': file does not exist")
    if kwargs:
        raise BadInput(f"model 'torchscript:{file}': kwargs do not apply to a saved module")
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": the user's file, not ours
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise BadInput(f"model 'torchscript:{file}' is not a TorchScript module (torch.jit.save): "
                       f"{type(exc).__name__}: {first} (for a state_dict use python:FILE.py:factory with "
                       "model.weights)") from None
    if not isinstance(module, torch.nn.Module):
        raise BadInput(f"model 'torchscript:{file}' holds a {type(module).__name__}, not a TorchScript module")
    module.fmap_graph_only = True
    return module
