"""`onnx:PATH`: an ONNX model file. Profiled from its graph, quantized and verified directly;
prune and visualize need the torch model and say so. A file that fails onnx.checker is bad input."""

from __future__ import annotations

from typing import Any

from pipeline.errors import BadInput
from pipeline.sources.registry import BuildContext, model_source


def _load_checked(file: str, ctx: BuildContext) -> tuple[Any, Any]:
    import onnx

    path = ctx.resolve(file)
    if not path.is_file():
        raise BadInput(f"model 'onnx:{file}': file does not exist")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise BadInput(f"model 'onnx:{file}' fails onnx.checker: {type(exc).__name__}: {first}") from None
    if len(proto.graph.input) != 1 or not proto.graph.input[0].type.HasField("tensor_type"):
        raise BadInput(f"model 'onnx:{file}': expected one tensor input, the graph has "
                       f"{len(proto.graph.input)}")
    return path, proto


def input_shape(file: str, kwargs: dict[str, Any], ctx: BuildContext) -> list[int] | None:
    _, proto = _load_checked(file, ctx)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if not shape:
        return None
    shape[0] = 1 if shape[0] is None else shape[0]
    if any(d is None or d <= 0 for d in shape):
        raise BadInput(f"model 'onnx:{file}': input '{proto.graph.input[0].name}' has dynamic dims {shape}; "
                       "set model.input_shape")
    return shape


@model_source("onnx", "onnx:PATH", input_shape=input_shape, editable=False, kind="ONNX graph")
def build(file: str, kwargs: dict[str, Any], ctx: BuildContext) -> Any:
    from pipeline.sources.onnx_module import OnnxModule

    if kwargs:
        raise BadInput(f"model 'onnx:{file}': kwargs do not apply to an ONNX file")
    path, _ = _load_checked(file, ctx)
    return OnnxModule(path)
