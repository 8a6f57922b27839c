"""Empirical bias correction (Nagel et al. 2019, sec. 4.2) for weight quantization, on ONNX.

Quantizing W shifts each output channel's mean by (W_q - W) . E[x]. With E[x] (per input channel,
measured on calibration batches, streamed) the shift is subtracted from the conv/gemm bias before
ORT quantizes, using the same scheme ORT will use (symmetric int8, scale = max|w|/127).
Plain, grouped and depthwise convs are handled (output channel o of group g reads input channels
g*Cin/G .. (g+1)*Cin/G - 1); depthwise convs matter most in MobileNet-style nets, whose 3x3 kernels
have few weights per channel and so the largest relative rounding error.
E[x] is taken as spatially constant, which ignores zero padding at the borders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.quantization.graph import attr, channel_stats, index, set_initializer
from dataclasses import dataclass
from pipeline.quantization.passes import QuantPass, QuantState, register


def fake_quant(w: np.ndarray, per_channel: bool = True) -> np.ndarray:
    """Symmetric int8 round trip as ORT does it (range [-127, 127])."""
    flat = np.abs(w.reshape(w.shape[0], -1)).max(1) if per_channel else np.full(w.shape[0], np.abs(w).max())
    scale = np.maximum(flat, 1e-12) / 127.0
    shape = (-1,) + (1,) * (w.ndim - 1)
    return np.clip(np.round(w / scale.reshape(shape)), -127, 127) * scale.reshape(shape)


def mean_shift(dw: np.ndarray, mean_x: np.ndarray, group: int = 1) -> np.ndarray:
    """Expected output shift per output channel, (W_q - W) . E[x], for a conv with `group` groups
    (Gemm: dw is [out, in], group 1). dw: [out, in/group, ...]; mean_x: [in]."""
    per_in = dw.reshape(dw.shape[0], dw.shape[1], -1).sum(2)  # [out, in/group]
    out_per_group = dw.shape[0] // group
    x_grouped = mean_x.reshape(group, -1)  # [group, in/group]
    idx = np.arange(dw.shape[0]) // out_per_group
    return (per_in * x_grouped[idx]).sum(1)


def _targets(graph: Any, inits: dict[str, Any]) -> list[Any]:
    return [n for n in graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2
            and n.input[1] in inits and n.input[2] in inits
            and not (n.op_type == "Gemm" and attr(n, "transB", 0) != 1)]


def correct_biases(src: Path, dst: Path, reader: Any, per_channel: bool = True) -> tuple[Path, int]:
    """Write a bias-corrected copy of `src` to `dst`; return (dst, layers corrected)."""
    import onnx
    from onnx import numpy_helper

    from pipeline.export.onnx import save_onnx

    model = onnx.load(str(src))
    graph = model.graph
    inits, _, _ = index(graph)
    targets = _targets(graph, inits)
    if not targets:
        save_onnx(model, dst)
        return dst, 0
    stats = channel_stats(model, list(dict.fromkeys(n.input[0] for n in targets)), reader)
    for node in targets:
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        group = attr(node, "group", 1) if node.op_type == "Conv" else 1
        shift = mean_shift(fake_quant(w, per_channel) - w, stats[node.input[0]]["mean"], group)
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        set_initializer(graph, node.input[2], b - shift)
    save_onnx(model, dst)
    return dst, len(targets)


# -- the pass ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BiasCorrectionConfig:
    per_channel: bool


@register
class BiasCorrection(QuantPass[BiasCorrectionConfig]):
    name = "bias_correction"
    order = 30

    def configure(self, stage_cfg: Any) -> BiasCorrectionConfig | None:
        if not stage_cfg.bias_correction:
            return None
        return BiasCorrectionConfig(stage_cfg.per_channel)

    def run(self, state: QuantState, config: BiasCorrectionConfig) -> None:
        assert state.prep is not None
        state.prep, corrected = correct_biases(state.prep, state.work / "prep_bc.onnx", state.reader, config.per_channel)
        state.metrics["bias_corrected_layers"] = corrected
