"""Adopt a user's ONNX file as the run's FP32 artifact (for `onnx:` models, which need no export).

The copy gets the names every later stage uses (input `input`, output `output`), a dynamic batch
dimension where the graph allows one (calibration and latency run real batches), and distinct
Conv/Gemm initializers (see `make_initializers_distinct`). The original file is never modified.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.export.onnx import INPUT_NAME, OUTPUT_NAME, check_onnx, make_initializers_distinct, save_onnx


def _rename(proto: Any, old: str, new: str) -> None:
    if old == new:
        return
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for vi in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        if vi.name == old:
            vi.name = new


def _dynamic_batch(proto: Any) -> Any:
    """A copy whose input/output batch dims are symbolic, or None when the graph bakes in batch 1."""
    import onnx
    import onnxruntime as ort

    trial = onnx.ModelProto()
    trial.CopyFrom(proto)
    del trial.graph.value_info[:]
    for vi in [trial.graph.input[0], *trial.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = "batch"
    shape = [d.dim_value or 1 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    try:
        sess = ort.InferenceSession(trial.SerializeToString(), providers=["CPUExecutionProvider"])
        out = sess.run(None, {INPUT_NAME: np.zeros([2, *shape[1:]], np.float32)})[0]
    except Exception:  # e.g. a Reshape to [1, -1] baked in by the exporter
        return None
    return trial if out.shape[0] == 2 else None


def adopt_onnx(src: str | Path, dst: str | Path) -> tuple[Path, bool]:
    """Write the prepared copy of `src` to `dst`; return (path, whether the batch is dynamic)."""
    import onnx

    proto = onnx.load(str(src))
    _rename(proto, proto.graph.input[0].name, INPUT_NAME)
    _rename(proto, proto.graph.output[0].name, OUTPUT_NAME)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dynamic = bool(dims) and not dims[0].HasField("dim_value")
    if not dynamic:
        trial = _dynamic_batch(proto)
        if trial is not None:
            proto, dynamic = trial, True
    make_initializers_distinct(proto)
    path = save_onnx(proto, dst)
    check_onnx(path)
    return path, dynamic
