"""Empirical bias correction (Nagel et al. 2019, sec. 4.2) for weight quantization, on ONNX.

Quantizing W shifts each output channel's mean by (W_q - W) . E[x]. With E[x] (per input channel,
measured on calibration batches, streamed) the shift is subtracted from the conv/gemm bias before
ORT quantizes, using the same scheme ORT will use (symmetric per-channel int8, scale = max|w|/127).
E[x] is taken as spatially constant, which ignores zero padding at the borders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.quantization.graph import attr, index, set_initializer


def fake_quant(w: np.ndarray, per_channel: bool = True) -> np.ndarray:
    """Symmetric int8 round trip as ORT does it (range [-127, 127])."""
    flat = np.abs(w.reshape(w.shape[0], -1)).max(1) if per_channel else np.full(w.shape[0], np.abs(w).max())
    scale = np.maximum(flat, 1e-12) / 127.0
    shape = (-1,) + (1,) * (w.ndim - 1)
    return np.clip(np.round(w / scale.reshape(shape)), -127, 127) * scale.reshape(shape)


def correct_biases(src: Path, dst: Path, reader: Any, per_channel: bool = True) -> tuple[Path, int]:
    """Write a bias-corrected copy of `src` to `dst`; return (dst, layers corrected)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from pipeline.export.onnx import save_onnx

    model = onnx.load(str(src))
    graph = model.graph
    inits, _, _ = index(graph)
    targets = [n for n in graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2
               and n.input[1] in inits and n.input[2] in inits and attr(n, "group", 1) == 1
               and not (n.op_type == "Gemm" and attr(n, "transB", 0) != 1)]
    if not targets:
        save_onnx(model, dst)
        return dst, 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    names = list(dict.fromkeys(n.input[0] for n in targets))
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    reader.rewind()
    for feed in iter(reader.get_next, None):
        outs = session.run(names, feed)
        for name, arr in zip(names, outs):
            axes = (0,) + tuple(range(2, arr.ndim))
            sums[name] = sums.get(name, 0) + arr.astype(np.float64).sum(axis=axes)
            counts[name] = counts.get(name, 0) + int(arr.size // arr.shape[1])
    reader.rewind()
    for node in targets:
        mean_x = sums[node.input[0]] / max(counts[node.input[0]], 1)
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        dw = fake_quant(w, per_channel) - w
        shift = dw.reshape(dw.shape[0], dw.shape[1], -1).sum(2) @ mean_x  # [out]
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        set_initializer(graph, node.input[2], b - shift)
    save_onnx(model, dst)
    return dst, len(targets)
