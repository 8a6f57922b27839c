"""Where the QDQ file quantizes, found in the torch model: the placement QAT must simulate.

Quantization-aware training only helps if torch rounds exactly where, and with the scales that, the
exported QDQ file does. So placement is read from that file, never re-derived from the torch graph:
- every activation `QuantizeLinear` (tensor, scale, zero point, integer range), located in torch by
  *value*: the float ONNX and the torch model run on the same input, and each quantized tensor is
  matched to the module call (input or output, and which call for a module used twice) that
  computes the same numbers. The torch exporter folds BatchNorm and fuses activations, so names
  alone cannot say whether `/blocks.3/Add_output_0` is a block's output; values can;
- every quantized Conv/Gemm weight, located by the exporter's scope name (`/a/a.0/conv/Conv` ->
  module `a.0.conv`) and checked by shape, with its channel axis and integer range.
Tensors that match no module call are reported, not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.profiling.onnx_graph import module_path

_INT_RANGE = {2: (0, 255), 3: (-128, 127)}  # onnx TensorProto UINT8, INT8


@dataclass(frozen=True)
class ActivationPoint:
    """One quantized activation tensor and where torch computes it."""

    tensor: str
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    module: str = ""  # "" = the model itself (its input)
    call: int = 0  # which call of `module` in one forward
    side: str = "output"  # "input" (first positional argument) or "output"


@dataclass(frozen=True)
class WeightPoint:
    """A Conv/Gemm whose weight the QDQ file stores as integer codes."""

    node: str
    module: str
    axis: int | None  # channel axis of per-channel scales; None = per tensor
    qmax: int  # largest code magnitude (127, or 63 for 7-bit weights)
    transposed: bool  # ONNX weight is the torch weight transposed (Gemm transB=0, MatMul)


@dataclass
class Placement:
    activations: list[ActivationPoint] = field(default_factory=list)
    weights: list[WeightPoint] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # quantized tensors no module call computes

    def to_dict(self) -> dict[str, Any]:
        return {"activations": len(self.activations), "weights": len(self.weights),
                "unmatched_activations": self.unmatched}


def quantized_tensors(qdq: Any) -> dict[str, tuple[float, int, int, int]]:
    """{float tensor: (scale, zero point, qmin, qmax)} for each activation QuantizeLinear of `qdq`."""
    from onnx import numpy_helper

    inits = {t.name: t for t in qdq.graph.initializer}
    out: dict[str, tuple[float, int, int, int]] = {}
    for node in qdq.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp = inits[node.input[2]]
        if scale.size != 1 or zp.data_type not in _INT_RANGE:
            continue
        qmin, qmax = _INT_RANGE[zp.data_type]
        out[node.input[0]] = (float(scale.reshape(())), int(numpy_helper.to_array(zp).reshape(())), qmin, qmax)
    return out


def quantized_weights(qdq: Any, model: nn.Module) -> list[WeightPoint]:
    """The Conv/Gemm/MatMul layers of `qdq` with integer weights that map onto a torch Conv/Linear."""
    from onnx import numpy_helper

    from pipeline.quantization.graph import attr, qdq_matrix_layers

    inits = {t.name: t for t in qdq.graph.initializer}
    modules = dict(model.named_modules())
    points = []
    for node, _, w_dq in qdq_matrix_layers(qdq.graph):
        mod = modules.get(module_path(node.name))
        if not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        codes = numpy_helper.to_array(inits[w_dq.input[0]])
        shape, tshape = tuple(codes.shape), tuple(mod.weight.shape)
        transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not attr(node, "transB", 0))
        if shape != (tshape[::-1] if transposed else tshape):
            continue
        axis = attr(w_dq, "axis", 1) if numpy_helper.to_array(inits[w_dq.input[1]]).size > 1 else None
        if axis is not None and transposed:
            axis = codes.ndim - 1 - axis
        points.append(WeightPoint(node.name, module_path(node.name), axis,
                                  int(np.abs(codes.astype(np.int32)).max()), transposed))
    return points


class _CallRecorder:
    """Forward hooks on every module that record each call's first input and output tensors."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: dict[str, list[tuple[torch.Tensor | None, torch.Tensor | None]]] = {}
        self.hooks = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules()]

    def _hook(self, name: str):
        def hook(_m: nn.Module, args: tuple, out: Any) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            y = out if isinstance(out, torch.Tensor) else None
            self.calls.setdefault(name, []).append((x, y))
        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _same(a: torch.Tensor | None, b: np.ndarray) -> bool:
    """Same numbers; a reshape (Flatten after a functional pool) counts, as rounding commutes with it."""
    if a is None or a.numel() != b.size or a.shape[:1] != b.shape[:1]:
        return False
    ref = torch.from_numpy(b)
    return bool((a.reshape(ref.shape) - ref).abs().max() <= 1e-4 * (ref.abs().max() + 1.0))


def locate(model: nn.Module, float_onnx: Path, tensors: dict[str, tuple[float, int, int, int]],
           example: torch.Tensor) -> Placement:
    """Match each quantized tensor of the float ONNX file to the torch module call computing it."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(float_onnx))
    graph_inputs = {i.name for i in proto.graph.input}
    names = [t for t in tensors if t not in graph_inputs]
    for name in names:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = example.detach().float().cpu()
    values = dict(zip(names, sess.run(names, {proto.graph.input[0].name: x.numpy()}))) if names else {}
    recorder = _CallRecorder(model)
    try:
        with torch.no_grad():
            model(x)
    finally:
        recorder.close()
    producers = {o: n.name for n in proto.graph.node for o in n.output}
    placement = Placement()
    for tensor, (scale, zp, qmin, qmax) in tensors.items():
        if tensor in graph_inputs:
            placement.activations.append(ActivationPoint(tensor, scale, zp, qmin, qmax, "", 0, "input"))
            continue
        hit = _best_call(recorder.calls, values[tensor], module_path(producers.get(tensor, "")))
        if hit is None:
            placement.unmatched.append(tensor)
        else:
            placement.activations.append(ActivationPoint(tensor, scale, zp, qmin, qmax, *hit))
    return placement


def _best_call(calls: dict[str, list[tuple[Any, Any]]], value: np.ndarray, scope: str) -> tuple[str, int, str] | None:
    """The module call whose output (else input) equals `value`; within the producer's scope and
    deepest first, so a tensor is simulated where its own layer computes it."""
    hits: list[tuple[int, int, str, int, str]] = []
    for name, records in calls.items():
        for i, (x, y) in enumerate(records):
            for side, t in (("output", y), ("input", x)):
                if _same(t, value):
                    in_scope = int(bool(name) and (scope == name or scope.startswith(name + ".")))
                    exact = int(t is not None and tuple(t.shape) == value.shape)
                    hits.append((exact, in_scope, int(side == "output"), name.count(".") + (name != ""), name, i, side))
    if not hits:
        return None
    *_, name, call, side = max(hits)
    return name, call, side
