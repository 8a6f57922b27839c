"""Cross-layer equalization (Nagel et al., "Data-Free Quantization", ICCV 2019) on the ONNX graph.

For a pair Conv A -> (Relu) -> Conv B (either may be depthwise) where A's output feeds only B, channel c of A is scaled by
1/s_c and B's input channel c by s_c with s_c = sqrt(r_A(c) / r_B(c)) (r = max |weight| of that
channel). ReLU is positively homogeneous, so the function is unchanged, but per-tensor ranges
become even. Done on ONNX because BatchNorm is already folded into the convs there. ReLU6 (Clip)
is not homogeneous and is skipped (Nagel et al. swap it for ReLU, which changes the model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.quantization.graph import attr, index, set_initializer


def equalize(src: Path, dst: Path, iterations: int = 3) -> tuple[Path, int]:
    """Write an equalized copy of `src` to `dst`; return (dst, number of conv pairs equalized)."""
    import onnx
    from onnx import numpy_helper

    from pipeline.export.onnx import save_onnx

    model = onnx.load(str(src))
    graph = model.graph
    pairs = _pairs(graph)
    for _ in range(iterations):
        inits, _, _ = index(graph)
        for a, b in pairs:
            wa = numpy_helper.to_array(inits[a.input[1]]).astype(np.float64)
            wb = numpy_helper.to_array(inits[b.input[1]]).astype(np.float64)
            depthwise = attr(b, "group", 1) == wb.shape[0] and wb.shape[1] == 1 and attr(b, "group", 1) > 1
            ra = np.abs(wa.reshape(wa.shape[0], -1)).max(1)
            rb = np.abs(wb.reshape(wb.shape[0], -1)).max(1) if depthwise else np.abs(wb).max(axis=(0, 2, 3))
            s = np.sqrt(np.maximum(ra, 1e-12) / np.maximum(rb, 1e-12))
            s = np.where((ra > 1e-8) & (rb > 1e-8), s, 1.0)
            set_initializer(graph, a.input[1], wa / s.reshape(-1, 1, 1, 1))
            if len(a.input) > 2 and a.input[2]:
                set_initializer(graph, a.input[2], numpy_helper.to_array(inits[a.input[2]]) / s)
            scale_b = s.reshape(-1, 1, 1, 1) if depthwise else s.reshape(1, -1, 1, 1)
            set_initializer(graph, b.input[1], wb * scale_b)
            inits, _, _ = index(graph)
    save_onnx(model, dst)
    return dst, len(pairs)


def _pairs(graph: Any) -> list[tuple[Any, Any]]:
    inits, _, consumers = index(graph)
    pairs = []
    for a in graph.node:
        if a.op_type != "Conv" or a.input[1] not in inits:
            continue
        wa = inits[a.input[1]]
        if attr(a, "group", 1) not in (1, wa.dims[0]):  # plain or depthwise: scaling is per output channel
            continue
        out = a.output[0]
        users = consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Relu":
            out = users[0].output[0]
            users = consumers.get(out, [])
        if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != out:
            continue
        b = users[0]
        if b.input[1] not in inits:
            continue
        group = attr(b, "group", 1)
        wb = inits[b.input[1]]
        if group == 1 or (group == wb.dims[0] and wb.dims[1] == 1):
            pairs.append((a, b))
    return pairs
