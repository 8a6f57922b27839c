"""Small read helpers over an ONNX graph shared by equalization and bias correction."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def index(graph: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[Any]]]:
    """(initializers by name, producer node by tensor, consumer nodes by tensor)."""
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return inits, producer, consumers


def qdq_matrix_layers(graph: Any, op_types: tuple[str, ...] = ("Conv", "Gemm", "MatMul")) -> Iterator[tuple[Any, Any, Any]]:
    """(layer, activation QuantizeLinear, weight DequantizeLinear) for every layer of a QDQ graph
    whose input is quantized and whose weight is stored as integer codes: the layers the
    saturation check, the overflow fix and GPTQ rounding work on."""
    inits, producer, _ = index(graph)
    for node in graph.node:
        if node.op_type not in op_types or len(node.input) < 2:
            continue
        a_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if a_dq is None or w_dq is None or a_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        a_q = producer.get(a_dq.input[0])
        if a_q is not None and a_q.op_type == "QuantizeLinear" and w_dq.input[0] in inits:
            yield node, a_q, w_dq


def attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_initializer(graph: Any, name: str, array: Any) -> None:
    from onnx import numpy_helper

    for i, t in enumerate(graph.initializer):
        if t.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(t).dtype), name))
            return
    raise KeyError(name)


def tensor_batches(model: Any, names: list[str], reader: Any) -> Iterator[dict[str, Any]]:
    """Stream the float tensors `names` of `model` (graph inputs included), one dict per batch of
    `reader`, from one session with those tensors added as outputs. Every pass over calibration
    data that needs intermediate tensors (statistics, histograms, patches) goes through here."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    inputs = {i.name for i in probe.graph.input}
    fetched = [n for n in names if n not in inputs]  # graph inputs are read from the feed itself
    for name in fetched:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    reader.rewind()
    for feed in iter(reader.get_next, None):
        arrays = dict(zip(fetched, session.run(fetched, feed) if fetched else []))
        arrays.update({n: feed[n] for n in names if n in inputs})
        yield arrays
    reader.rewind()


def channel_stats(model: Any, names: list[str], reader: Any) -> dict[str, dict[str, Any]]:
    """Per-channel mean, max and min of the float tensors `names` over `reader`'s batches (streamed).

    Bias correction needs E[x] per input channel; ReLU6-aware equalization needs the largest
    pre-clip value per channel; the saturation check needs each channel's range. One extra pass
    over the calibration data serves each of them.
    """
    import numpy as np

    stats: dict[str, dict[str, Any]] = {n: {"sum": 0.0, "count": 0, "max": None, "min": None} for n in names}
    for arrays in tensor_batches(model, names, reader):
        for name in names:
            arr = arrays[name]
            axes = (0,) + tuple(range(2, arr.ndim))
            s = stats[name]
            s["sum"] = s["sum"] + arr.astype(np.float64).sum(axis=axes)
            s["count"] += int(arr.size // arr.shape[1])
            mx, mn = arr.max(axis=axes).astype(np.float64), arr.min(axis=axes).astype(np.float64)
            s["max"] = mx if s["max"] is None else np.maximum(s["max"], mx)
            s["min"] = mn if s["min"] is None else np.minimum(s["min"], mn)
    return {n: {"mean": s["sum"] / max(s["count"], 1), "max": s["max"], "min": s["min"]} for n, s in stats.items()}
