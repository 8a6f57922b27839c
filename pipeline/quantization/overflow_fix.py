"""Overflow fix for kernels that saturate int16 pairs: widen the weight scale of each output channel
at risk just enough that its worst pair fits, and leave every other channel at full 8 bits.

onnxruntime's remedy (`reduce_range`) and NNCF's overflow fix give whole tensors 7-bit weights:
one bit of precision lost on every channel. A channel's worst pair (for any input, saturation.py)
is set by its two largest adjacent weights of one sign, so many channels need a widening well
below 2x, or none: they keep most of the precision that 7 bits throw away. The QDQ file is edited in place: the channel's
int8 codes are re-rounded from the float weights, its weight scale grows, and the int32 bias codes
(scale = activation scale x weight scale) are re-rounded to match. Weights stored per tensor are
widened as one. Rounding can push a pair back over the limit, so the check runs again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.quantization.saturation import LayerRisk, at_risk, check

MARGIN = 1.002  # widen a little beyond the exact ratio so rounding rarely needs a second round


def widen_scales(qdq_path: Path, float_path: Path, ranges: dict[str, Any],
                 rounds: int = 4) -> tuple[dict[str, dict[str, Any]], list[LayerRisk]]:
    """Edit `qdq_path` until no layer is at risk (or `rounds` run out). Returns what was widened per
    layer, {layer: {"channels": n, "of": total, "max_factor": f}}, and the layers still at risk."""
    import onnx
    from onnx import numpy_helper

    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(float_path)).graph.initializer}
    done: dict[str, dict[str, Any]] = {}
    for round_ in range(rounds + 1):
        risky = at_risk(check(qdq_path, ranges))
        if not risky or round_ == rounds:
            break
        model = onnx.load(str(qdq_path))
        for risk in risky:
            factor = _widen_layer(model, risk, floats)
            entry = done.setdefault(risk.layer, {"channels": 0, "of": risk.channels, "max_factor": 1.0, "_f": None})
            entry["_f"] = factor if entry["_f"] is None else entry["_f"] * factor
        onnx.save(model, str(qdq_path))
    for entry in done.values():
        f = entry.pop("_f")
        entry["channels"], entry["max_factor"] = int((f > 1).sum()), round(float(f.max()), 4)
    return done, risky


def _widen_layer(model: Any, risk: LayerRisk, floats: dict[str, np.ndarray]) -> np.ndarray:
    """Widen one layer's at-risk channels in `model`; returns the factor applied per channel."""
    from pipeline.quantization.graph import index, set_initializer

    from onnx import numpy_helper

    inits, producer, _ = index(model.graph)
    node = next(n for n in model.graph.node if n.name == risk.layer)
    w_dq = producer[node.input[1]]
    codes = numpy_helper.to_array(inits[w_dq.input[0]])
    scale = numpy_helper.to_array(inits[w_dq.input[1]]).astype(np.float64)
    ratio = np.asarray(risk.channel_ratio, dtype=np.float64)
    factor = np.where(ratio > 1.0, ratio * MARGIN, 1.0)
    if scale.ndim == 0 or scale.size == 1:  # per-tensor weights widen as one
        factor = np.full_like(ratio, float(factor.max()))
    w_float = floats.get(risk.weight)
    if w_float is None:  # no float copy: start from the dequantized weights
        w_float = codes.astype(np.float64) * _per_channel(scale, codes, risk.weight_axis)
    new_scale = scale * (factor if scale.size > 1 else factor.max())
    new_codes = np.clip(np.round(w_float / _per_channel(new_scale, codes, risk.weight_axis)), -127, 127)
    set_initializer(model.graph, w_dq.input[0], new_codes.astype(codes.dtype))
    set_initializer(model.graph, w_dq.input[1], new_scale.astype(np.float32))
    if len(node.input) > 2 and node.input[2] in producer and producer[node.input[2]].op_type == "DequantizeLinear":
        _rescale_bias(model, producer[node.input[2]], inits, factor if scale.size > 1 else np.full_like(factor, factor.max()))
    return factor


def _per_channel(scale: np.ndarray, codes: np.ndarray, axis: int) -> np.ndarray:
    if scale.size == 1:
        return scale.reshape(())
    shape = [1] * codes.ndim
    shape[axis] = scale.size
    return scale.reshape(shape)


def _rescale_bias(model: Any, b_dq: Any, inits: dict[str, Any], factor: np.ndarray) -> None:
    """int32 bias codes use scale = activation scale x weight scale: keep the float bias unchanged."""
    from onnx import numpy_helper

    from pipeline.quantization.graph import set_initializer

    b_codes = numpy_helper.to_array(inits[b_dq.input[0]]).astype(np.float64)
    b_scale = numpy_helper.to_array(inits[b_dq.input[1]]).astype(np.float64)
    bias = b_codes * b_scale
    new_scale = b_scale * (factor if b_scale.size > 1 else np.float64(factor.max()))
    set_initializer(model.graph, b_dq.input[0], np.round(bias / new_scale).astype(np.int32))
    set_initializer(model.graph, b_dq.input[1], new_scale.astype(np.float32))
