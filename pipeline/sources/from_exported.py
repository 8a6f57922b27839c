"""`exported:PATH`: a `torch.export.save`d ExportedProgram (.pt2), run through `.module()`.

The graph is flattened to aten ops (no submodules), so profile reads an ONNX view of it and
prune/visualize refuse with a reason.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import BadInput
from pipeline.sources.registry import BuildContext, model_source


def input_shape(file: str, kwargs: dict[str, Any], ctx: BuildContext) -> list[int] | None:
    """The shape the program was exported with (batch 1 where it is symbolic)."""
    from pipeline.sources.exported_module import input_meta

    program = _load(file, ctx)
    shape = input_meta(program)
    if not shape or not all(isinstance(d, int) for d in shape[1:]):
        return None  # dynamic spatial dims: the recipe's model.input_shape decides
    return [shape[0] if isinstance(shape[0], int) else 1, *shape[1:]]


@model_source("exported", "exported:PATH", input_shape=input_shape, editable=False, kind="torch.export program")
def build(file: str, kwargs: dict[str, Any], ctx: BuildContext) -> Any:
    if kwargs:
        raise BadInput(f"model 'exported:{file}': kwargs do not apply to a saved program")
    from pipeline.sources.exported_module import ExportedModule

    return ExportedModule(_load(file, ctx))


def _load(file: str, ctx: BuildContext) -> Any:
    import torch

    path = ctx.resolve(file)
    if not path.is_file():
        raise BadInput(f"model 'exported:{file}': file does not exist")
    import logging

    quiet = logging.getLogger("torch.export")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # torch logs the whole traceback before raising; one line is enough
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise BadInput(f"model 'exported:{file}' is not a torch.export program (torch.export.save .pt2): "
                       f"{type(exc).__name__}: {first}") from None
    finally:
        quiet.setLevel(level)
    return program
