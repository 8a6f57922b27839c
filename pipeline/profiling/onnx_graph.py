"""Profile an ONNX graph: per-node shapes, parameters, MACs, receptive field and liveness peak.

For models fmap cannot hook (an `onnx:` file, a TorchScript or torch.export program, profiled via
its ONNX export). Shapes come from onnx's shape inference with the input fixed to a concrete batch;
MACs follow the same conventions as the torch profiler (pipeline/profiling/graph.py): Conv/Gemm/
MatMul count multiply-accumulates, elementwise ops, norms and activations one per output value,
pooling one per window element, views and copies zero. Liveness: a tensor lives from the node that
produces it to its last consumer; reshapes alias their input; graph outputs live to the end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

_VIEWS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"}
_ZERO = _VIEWS | {"Concat", "Transpose", "Shape", "Gather", "Constant", "ConstantOfShape", "Slice", "Split",
                  "Cast", "Expand", "Tile", "Pad", "Resize", "Upsample", "Range", "Size", "QuantizeLinear",
                  "DequantizeLinear"}
_POOL = {"MaxPool", "AveragePool", "LpPool"}
_GLOBAL_POOL = {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax"}
_ELEM_BYTES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2}  # onnx TensorProto dtypes


def module_path(node_name: str) -> str:
    """`/layer1/layer1.0/conv1/Conv` (the torch exporter's scope naming) -> `layer1.0.conv1`."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return node_name
    path = ""
    for seg in parts[:-1]:
        path = seg if (not path or seg.startswith(path + ".")) else f"{path}.{seg}"
    return path


def _concrete(proto: Any, input_shape: list[int]) -> Any:
    """A copy with the input fixed to `input_shape` and shapes inferred through the graph."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    del model.graph.value_info[:]
    for out in model.graph.output:  # symbolic output dims would survive inference otherwise
        out.type.tensor_type.ClearField("shape")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, input_shape):
        d.Clear()
        d.dim_value = int(v)
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def _shapes(model: Any) -> dict[str, tuple[list[int] | None, int]]:
    out: dict[str, tuple[list[int] | None, int]] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else None
        out[vi.name] = (None if dims is None or None in dims else dims, _ELEM_BYTES.get(t.elem_type, 4))
    return out


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _macs(node: Any, shapes: dict[str, Any], inits: dict[str, list[int]]) -> int:
    op = node.op_type
    out = shapes.get(node.output[0], (None, 4))[0] if node.output else None
    if out is None or op in _ZERO:
        return 0
    numel = math.prod(out)
    if op in ("Conv", "ConvTranspose") and node.input[1] in inits:
        w = inits[node.input[1]]
        if op == "ConvTranspose":
            x = shapes.get(node.input[0], (None, 4))[0]
            return math.prod(x) * math.prod(w[1:]) if x else 0
        return numel * math.prod(w[1:])
    if op in ("Gemm", "MatMul"):
        a = shapes.get(node.input[0], (None, 4))[0] or inits.get(node.input[0])
        if not a:
            return 0
        k = a[0] if op == "Gemm" and _attr(node, "transA", 0) and len(a) == 2 else a[-1]
        return numel * int(k)
    if op in _POOL:
        return numel * math.prod(_attr(node, "kernel_shape", [1]))
    if op in _GLOBAL_POOL:
        x = shapes.get(node.input[0], (None, 4))[0]
        return math.prod(x) if x else numel
    return numel  # elementwise, normalisation, activation


def profile_onnx(path: str | Path, input_shape: list[int], method: str = "onnx") -> dict[str, Any]:
    """The same JSON-ready dict as `profile_model` (layers, totals, memory, timeline), from the graph."""
    import onnx

    model = _concrete(onnx.load(str(path)), input_shape)
    shapes = _shapes(model)
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    init_bytes = {t.name: math.prod(t.dims) * _ELEM_BYTES.get(t.data_type, 4) for t in model.graph.initializer}
    graph_in = model.graph.input[0].name
    nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    walk = _Walk(graph_in)
    layers = [walk.layer(i, n, shapes, inits) for i, n in enumerate(nodes)]
    for o in (o.name for o in model.graph.output):
        if o in walk.alias:
            walk.last[walk.alias[o]] = len(nodes)
    peak, peak_at, alive, timeline = walk.liveness(nodes, layers)
    bs = int(input_shape[0])
    in_shape, in_eb = shapes.get(graph_in, (input_shape, 4))
    macs = sum(r["macs"] for r in layers)
    memory = {
        "batch_size": bs, "liveness_peak_bytes": int(peak), "liveness_peak_per_sample_bytes": int(peak) // max(bs, 1),
        "peak_at": peak_at, "alive_at_peak": alive, "measured_peak_bytes": None,
        "measured_peak_with_scratch_bytes": None, "measured_method": None,
        "naive_sum_bytes": int(sum(r["bytes"] for r in layers)),
        "input_bytes": int(math.prod(in_shape or input_shape) * in_eb), "param_bytes": int(sum(init_bytes.values())),
    }
    totals = {"params": int(sum(math.prod(d) for d in inits.values())), "macs": int(macs),
              "macs_per_sample": int(macs) // max(bs, 1), "nodes": len(layers), "graph_method": method,
              "fallback_reason": None, "input_shape": list(input_shape)}
    return {"layers": layers, "totals": totals, "memory": memory, "timeline": timeline}


class _Walk:
    """One pass over the nodes in order: per-tensor storage (views alias their input), size, last
    use, receptive field and producer; then the liveness peak from those."""

    def __init__(self, graph_in: str) -> None:
        self.alias: dict[str, str] = {graph_in: graph_in}  # tensor -> the storage it lives in
        self.size: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.rf: dict[str, tuple[int, int]] = {graph_in: (1, 1)}  # tensor -> (receptive field, stride)
        self.producers: dict[str, str] = {graph_in: "input"}

    def _receptive(self, n: Any, shapes: dict[str, Any]) -> tuple[int, int]:
        r, s = max((self.rf[x] for x in n.input if x in self.rf), default=(1, 1))
        if n.op_type in ("Conv", *_POOL):
            k = max(_attr(n, "kernel_shape", [1]) or [1])
            d = max(_attr(n, "dilations", [1]) or [1])
            st = max(_attr(n, "strides", [1]) or [1])
            return r + ((k - 1) * d) * s, s * st
        if n.op_type in _GLOBAL_POOL and n.input[0] in shapes and shapes[n.input[0]][0]:
            spatial = max(shapes[n.input[0]][0][2:] or [1])  # the whole remaining map: its span in the input
            return r + (spatial - 1) * s, s * spatial
        return r, s

    def layer(self, i: int, n: Any, shapes: dict[str, Any], inits: dict[str, list[int]]) -> dict[str, Any]:
        """Record node `i`'s outputs; its row of the per-layer table."""
        for name in n.input:
            if name in self.alias:
                self.last[self.alias[name]] = i
        r, s = self._receptive(n, shapes)
        name = module_path(n.name) if n.name else f"{n.op_type}_{i}"
        out_bytes = 0
        for o in n.output:
            oshape, eb = shapes.get(o, (None, 4))
            nbytes = math.prod(oshape) * eb if oshape else 0
            out_bytes += nbytes
            self.rf[o] = (r, s)
            self.producers[o] = name
            if n.op_type in _VIEWS and n.input and n.input[0] in self.alias:
                self.alias[o] = self.alias[n.input[0]]
                self.last[self.alias[o]] = i
            else:
                self.alias[o], self.size[o], self.last[o] = o, nbytes, i
        params = sum(math.prod(inits[x]) for x in n.input if x in inits and len(inits[x]) > 0)
        shape = shapes.get(n.output[0], (None, 4))[0] if n.output else None
        return {
            "name": name, "type": n.op_type, "output_shape": shape,
            "channels": shape[1] if shape and len(shape) >= 2 else None,
            "volume": math.prod(shape[1:]) if shape and len(shape) >= 2 else None,
            "bytes": out_bytes, "params": int(params), "macs": int(_macs(n, shapes, inits)),
            "receptive_field": int(r), "stride": int(s),
            "inputs": [self.producers.get(x, "input") for x in n.input if x not in inits],
            "onnx_node": n.name,
        }

    def liveness(self, nodes: list[Any], layers: list[dict[str, Any]]) -> tuple[int, str, list[str], list[Any]]:
        """(peak bytes, node at the peak, producers alive there, [node, live bytes] timeline)."""
        live: dict[str, int] = {}
        peak, peak_at, alive, timeline = 0, "", [], []
        for i, (n, row) in enumerate(zip(nodes, layers)):
            for o in n.output:
                if self.alias.get(o) == o:
                    live[o] = self.size[o]
            current = sum(live.values())
            timeline.append([row["name"], int(current)])
            if current > peak:
                peak, peak_at, alive = current, row["name"], [self.producers[k] for k in live]
            for k in [k for k in live if self.last.get(k, i) <= i]:
                live.pop(k)
        return peak, peak_at, alive, timeline


def profile_graph_module(model: Any, example_input: Any, batch_size: int | None, view_path: Path) -> dict[str, Any]:
    """Profile a model fmap cannot hook: its own ONNX file, or an ONNX export of it written to `view_path`."""
    shape = list(example_input.shape)
    if batch_size is not None:
        shape[0] = batch_size
    source = getattr(model, "onnx_path", None)
    if source is not None:
        return profile_onnx(source, shape, method="onnx")
    from pipeline.export.onnx import export_onnx

    export_onnx(model, example_input[:1], view_path, dynamic_batch=True)
    return profile_onnx(view_path, shape, method="onnx (exported view)")
