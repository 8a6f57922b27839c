"""Static int16 saturation check of a QDQ model, for x86 kernels without VNNI (see targets.py).

For every quantized Conv/Gemm/MatMul the check bounds the sums that `vpmaddubsw` forms: two
adjacent u8 x s8 products along the reduction axis K, worst over the signs of the weights:

    worst_pos = max over pairs of sum(w > 0 ? hi_c * w : lo_c * w)   (and worst_neg alike)

A layer is *at risk* when a pair can leave [-32768, 32767] for **some input the file can
represent** (every u8 code 0..255): that is the guarantee the overflow fix gives, and what makes an
artifact bit-identical on every x86 CPU whatever the data. Next to it the report gives the
*observed* ratio, the same bound with each input channel's codes inside its calibrated range (per
channel, from the FP32 model on the calibration data, with the zero point that padding injects):
how close real data comes. Two K orders are checked, channels fastest (onnxruntime's NHWC im2col)
and kernel positions fastest (NCHW im2col), and the worse counts. Depthwise convs use a separate
int32 kernel and are safe. Weights with |w| <= 64 (7 bits, `reduce_range`) are safe whatever the
activations: 2 * 255 * 64 = 32640.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INT16_MAX, INT16_MIN = 32767, -32768


@dataclass
class LayerRisk:
    layer: str  # ONNX node name
    weight: str  # the float weight's name in the pre-quantization model (a TensorQuantOverrides key)
    op: str
    kernel: str  # "gemm" (pairs accumulate in int16 on AVX2) or "depthwise" (int32) or "unchecked"
    weight_bits: int  # 7 when every |w_q| <= 64, else 8
    worst_pos: int
    worst_neg: int
    channels_at_risk: int
    channels: int
    weight_axis: int = 0  # the output-channel axis of the stored weight (per-channel overrides need it)
    channel_ratio: np.ndarray | None = None  # per output channel: worst pair / int16 limit (> 1 saturates)
    observed_ratio: float = 0.0  # the same bound with each input channel inside its calibrated range

    @property
    def ratio(self) -> float:
        """How far the worst pair goes into int16's range: > 1 saturates."""
        return max(self.worst_pos / INT16_MAX, self.worst_neg / INT16_MIN)

    @property
    def at_risk(self) -> bool:
        return self.kernel == "gemm" and self.ratio > 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "weight": self.weight, "op": self.op, "kernel": self.kernel,
                "weight_bits": self.weight_bits, "worst_pair": max(self.worst_pos, -self.worst_neg),
                "ratio": round(self.ratio, 4), "observed_ratio": round(self.observed_ratio, 4),
                "at_risk_without_vnni": self.at_risk,
                "channels_at_risk": self.channels_at_risk, "channels": self.channels}


@dataclass
class _Quantized:
    node: Any
    act: str  # float activation tensor fed to QuantizeLinear
    act_scale: float
    act_zp: int  # in the u8 domain (int8 activations are shifted by 128, as MLAS does)
    act_signed: bool
    weight: np.ndarray  # int codes, [outputs, K...]
    weight_name: str
    weight_axis: int


def activation_ranges(float_path: Path, reader: Any) -> dict[str, dict[str, Any]]:
    """Per-channel min/max of every Conv/Gemm/MatMul input of the float model, in one pass over
    `reader`. Quantization never renames these tensors, so one pass serves every re-quantization."""
    import onnx

    from pipeline.quantization.graph import channel_stats

    model = onnx.load(str(float_path))
    inits = {t.name for t in model.graph.initializer}
    names = sorted({n.input[0] for n in model.graph.node
                    if n.op_type in ("Conv", "Gemm", "MatMul") and n.input and n.input[0] not in inits})
    return channel_stats(model, names, reader) if names else {}


def check(qdq_path: Path, ranges: dict[str, dict[str, Any]]) -> list[LayerRisk]:
    """Bound every quantized matrix layer of `qdq_path` with the float `ranges` of its input."""
    import onnx

    layers = [q for q in _quantized_layers(onnx.load(str(qdq_path))) if q.act in ranges]
    return [_bound(q, ranges[q.act]) for q in layers]


def at_risk(risks: list[LayerRisk]) -> list[LayerRisk]:
    return [r for r in risks if r.at_risk]


def summary(risks: list[LayerRisk]) -> dict[str, Any]:
    """What the report shows: the layers at risk and the worst margin."""
    risky = at_risk(risks)
    checked = [r for r in risks if r.kernel != "unchecked"]
    return {"layers_checked": len(checked), "layers_at_risk": [r.layer for r in risky],
            "worst_ratio": round(max((r.ratio for r in checked if r.kernel == "gemm"), default=0.0), 4),
            "safe_without_vnni": not risky, "layers": [r.to_dict() for r in risks]}


def _quantized_layers(model: Any) -> list[_Quantized]:
    from onnx import numpy_helper

    from pipeline.quantization.graph import attr, qdq_matrix_layers

    inits = {t.name: t for t in model.graph.initializer}
    out: list[_Quantized] = []
    for node, a_q, w_dq in qdq_matrix_layers(model.graph):
        scale = float(numpy_helper.to_array(inits[a_q.input[1]]).reshape(-1)[0])
        zp_arr = numpy_helper.to_array(inits[a_q.input[2]]) if len(a_q.input) > 2 and a_q.input[2] else np.uint8(0)
        signed = zp_arr.dtype == np.int8
        zp = int(np.asarray(zp_arr).reshape(-1)[0]) + (128 if signed else 0)
        w = numpy_helper.to_array(inits[w_dq.input[0]]).astype(np.int64)
        axis = 0
        if node.op_type == "MatMul" or (node.op_type == "Gemm" and not attr(node, "transB", 0)):
            w, axis = w.T, 1
        name = w_dq.input[0].removesuffix("_quantized")
        out.append(_Quantized(node, a_q.input[0], scale, zp, signed, w, name, axis))
    return out


def _codes(q: _Quantized, values: np.ndarray) -> np.ndarray:
    lo, hi = (-128, 127) if q.act_signed else (0, 255)
    shift = 128 if q.act_signed else 0
    return np.clip(np.round(values / q.act_scale) + q.act_zp - shift, lo, hi).astype(np.int64) + shift


def _bound(q: _Quantized, stats: dict[str, Any]) -> LayerRisk:
    """Worst pairs for any input the file can represent (codes 0..255: the guarantee) and for
    inputs inside each channel's calibrated range (how close real data comes)."""
    w = q.weight
    bits = 7 if int(np.abs(w).max(initial=0)) <= 64 else 8
    hi = np.maximum(_codes(q, np.asarray(stats["max"])), q.act_zp)  # padding reads the zero point
    lo = np.minimum(_codes(q, np.asarray(stats["min"])), q.act_zp)
    base = dict(layer=q.node.name, weight=q.weight_name, op=q.node.op_type, weight_bits=bits,
                channels=int(w.shape[0]), weight_axis=q.weight_axis)
    any_input = _layouts(q.node, w, np.full_like(hi, 255), np.zeros_like(lo))
    if isinstance(any_input, str):  # depthwise (int32 kernel) or a layout fmap cannot read
        return LayerRisk(kernel=any_input, worst_pos=0, worst_neg=0, channels_at_risk=0, **base)
    pos, neg = _worst(any_input)
    ratio = np.maximum(pos / INT16_MAX, neg / INT16_MIN)
    seen_pos, seen_neg = _worst(_layouts(q.node, w, hi, lo))  # type: ignore[arg-type]
    observed = float(np.maximum(seen_pos / INT16_MAX, seen_neg / INT16_MIN).max())
    return LayerRisk(kernel="gemm", worst_pos=int(pos.max()), worst_neg=int(neg.min()),
                     channels_at_risk=int((ratio > 1.0).sum()), channel_ratio=ratio, observed_ratio=observed,
                     **base)


def _layouts(node: Any, w: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> list[tuple[np.ndarray, ...]] | str:
    """(weights, code upper bounds, code lower bounds) as [outputs, K] in each K order the
    kernels may use; or the reason there is nothing to check."""
    from pipeline.quantization.graph import attr

    if node.op_type != "Conv":
        if w.ndim != 2 or hi.size != w.shape[1]:
            return "unchecked"
        return [(w, np.broadcast_to(hi, w.shape), np.broadcast_to(lo, w.shape))]
    groups, cig = int(attr(node, "group", 1)), w.shape[1]
    if cig == 1 and groups == w.shape[0] and groups == hi.size:
        return "depthwise"
    if hi.size != groups * cig:
        return "unchecked"
    per_out = np.arange(w.shape[0]) // (w.shape[0] // groups)  # group of each output channel
    idx = per_out[:, None] * cig + np.arange(cig)[None, :]  # [Cout, Cig] input channel indices
    h = np.broadcast_to(hi[idx][:, :, None, None], w.shape)
    lw = np.broadcast_to(lo[idx][:, :, None, None], w.shape)
    orders = [(0, 2, 3, 1), (0, 1, 2, 3)]  # channels fastest (NHWC), kernel positions fastest (NCHW)
    return [(w.transpose(o).reshape(w.shape[0], -1), h.transpose(o).reshape(w.shape[0], -1),
             lw.transpose(o).reshape(w.shape[0], -1)) for o in orders]


def _worst(mats: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, np.ndarray]:
    pos = np.full(mats[0][0].shape[0], np.iinfo(np.int64).min)
    neg = np.full(mats[0][0].shape[0], np.iinfo(np.int64).max)
    for wm, hm, lm in mats:
        p, n = _pair_extremes(wm, hm, lm)
        pos, neg = np.maximum(pos, p), np.minimum(neg, n)
    return pos, neg


def _pair_extremes(w: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output row: the largest and smallest sum of two adjacent products (K padded to even)."""
    pos = np.where(w > 0, hi * w, lo * w)
    neg = np.where(w < 0, hi * w, lo * w)
    if pos.shape[1] % 2:
        pad = np.zeros((pos.shape[0], 1), dtype=pos.dtype)
        pos, neg = np.concatenate([pos, pad], 1), np.concatenate([neg, pad], 1)
    pos = pos.reshape(pos.shape[0], -1, 2).sum(-1)
    neg = neg.reshape(neg.shape[0], -1, 2).sum(-1)
    return pos.max(1), neg.min(1)
