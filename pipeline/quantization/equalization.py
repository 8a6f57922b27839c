"""Cross-layer equalization (Nagel et al., "Data-Free Quantization", ICCV 2019) on the ONNX graph.

For a pair Conv A -> (Relu | ReLU6) -> Conv B (either may be depthwise) where A's output feeds only
B, channel c of A is scaled by 1/s_c and B's input channel c by s_c with s_c = sqrt(r_A(c) / r_B(c))
(r = max |weight| of that channel). ReLU is positively homogeneous, so the function is unchanged,
but per-channel weight ranges become even. Done on ONNX because BatchNorm is already folded there.

ReLU6 (Clip(0, 6)) is homogeneous only below the clip, so its pairs take one of three policies:
- "skip": leave them alone (exact; MobileNetV2's pairs all sit behind ReLU6, so little happens);
- "exact": clip-aware scaling. On channel c the scaled clip acts at 6*s_c instead of 6, which is
  harmless wherever the channel never reaches the clip: such channels (max pre-clip value m_c <= 6
  on calibration data) get s_c >= m_c / 6; channels that do clip keep s_c = 1. Exact on the
  calibration data, near-exact elsewhere;
- "relu": Nagel et al.'s choice, the Clip becomes a Relu (changes the model where values exceed 6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.quantization.graph import attr, channel_stats, index, set_initializer
from dataclasses import dataclass
from pipeline.quantization.passes import QuantPass, QuantState, register

Relu6Policy = Literal["skip", "exact", "relu"]

def equalize(src: Path, dst: Path, iterations: int = 3, relu6: Relu6Policy = "skip",
             reader: Any = None) -> tuple[Path, int]:
    """Write an equalized copy of `src` to `dst`; return (dst, number of conv pairs equalized).
    `reader` (calibration batches) is needed for relu6="exact"."""
    import onnx

    from pipeline.export.onnx import save_onnx

    if relu6 == "exact" and reader is None:
        raise ValueError("relu6='exact' needs calibration data (reader)")
    model = onnx.load(str(src))
    graph = model.graph
    pairs = _pairs(graph, relu6 != "skip")
    if relu6 == "relu":
        _clips_to_relu(graph, [clip for _, clip, _ in pairs if clip is not None])
    floors = _clip_floors(model, pairs, reader) if relu6 == "exact" else {}
    for _ in range(iterations):
        for a, clip, b in pairs:
            floor = floors.get(a.name) if clip is not None else None
            s = _equalize_pair(graph, a, b, floor)
            if floor is not None:  # A's outputs shrank by s: the floor for the next iteration does too
                floors[a.name] = floor / s
    save_onnx(model, dst)
    return dst, len(pairs)


def _equalize_pair(graph: Any, a: Any, b: Any, floor: np.ndarray | None) -> np.ndarray:
    """Rescale one pair in place and return s; `floor` (per channel, inf = must stay 1) bounds s."""
    from onnx import numpy_helper

    inits, _, _ = index(graph)
    wa = numpy_helper.to_array(inits[a.input[1]]).astype(np.float64)
    wb = numpy_helper.to_array(inits[b.input[1]]).astype(np.float64)
    depthwise = attr(b, "group", 1) == wb.shape[0] and wb.shape[1] == 1 and attr(b, "group", 1) > 1
    ra = np.abs(wa.reshape(wa.shape[0], -1)).max(1)
    rb = np.abs(wb.reshape(wb.shape[0], -1)).max(1) if depthwise else np.abs(wb).max(axis=(0, 2, 3))
    s = np.sqrt(np.maximum(ra, 1e-12) / np.maximum(rb, 1e-12))
    s = np.where((ra > 1e-8) & (rb > 1e-8), s, 1.0)
    if floor is not None:  # clip-aware: keep the clip inactive where the data never reached it
        s = np.where(np.isfinite(floor), np.maximum(s, floor), 1.0)
    set_initializer(graph, a.input[1], wa / s.reshape(-1, 1, 1, 1))
    if len(a.input) > 2 and a.input[2]:
        set_initializer(graph, a.input[2], numpy_helper.to_array(inits[a.input[2]]) / s)
    set_initializer(graph, b.input[1], wb * (s.reshape(-1, 1, 1, 1) if depthwise else s.reshape(1, -1, 1, 1)))
    return s


def _clip_floors(model: Any, pairs: list[tuple[Any, Any, Any]], reader: Any) -> dict[str, np.ndarray]:
    """Per pair behind a clip: the smallest s_c that keeps channel c's clip inactive on the
    calibration data (its max / clip level), or inf where the channel does reach the clip."""
    clipped = [(a, clip) for a, clip, _ in pairs if clip is not None]
    stats = channel_stats(model, [a.output[0] for a, _ in clipped], reader)
    inits, _, _ = index(model.graph)
    floors = {}
    for a, clip in clipped:
        top = _clip_max(clip, inits)
        mx = np.maximum(stats[a.output[0]]["max"], 0.0)
        floors[a.name] = np.where(mx < top, mx / top, np.inf)
    return floors


def _clip_max(clip: Any, inits: dict[str, Any]) -> float:
    from onnx import numpy_helper

    if len(clip.input) > 2 and clip.input[2] in inits:
        return float(numpy_helper.to_array(inits[clip.input[2]]))
    return float(attr(clip, "max", np.inf))


def _is_relu6(node: Any, inits: dict[str, Any]) -> bool:
    """Clip(0, c) with constant c: the only clip whose low side is positively homogeneous."""
    from onnx import numpy_helper

    if node.op_type != "Clip":
        return False
    if len(node.input) > 1:
        if not node.input[1] or node.input[1] not in inits:
            return False
        low = float(numpy_helper.to_array(inits[node.input[1]]))
    else:
        low = float(attr(node, "min", -np.inf))
    return low == 0.0 and np.isfinite(_clip_max(node, inits))


def _clips_to_relu(graph: Any, clips: list[Any]) -> None:
    for clip in clips:
        clip.op_type = "Relu"
        del clip.input[1:]
        del clip.attribute[:]


def _pairs(graph: Any, through_relu6: bool) -> list[tuple[Any, Any | None, Any]]:
    """(A, the Clip between them or None, B) for every equalizable Conv pair."""
    inits, _, consumers = index(graph)
    pairs = []
    for a in graph.node:
        if a.op_type != "Conv" or a.input[1] not in inits:
            continue
        if attr(a, "group", 1) not in (1, inits[a.input[1]].dims[0]):  # plain or depthwise
            continue
        out, clip = a.output[0], None
        users = consumers.get(out, [])
        if len(users) == 1 and (users[0].op_type == "Relu" or (through_relu6 and _is_relu6(users[0], inits))):
            clip = users[0] if users[0].op_type == "Clip" else None
            out = users[0].output[0]
            users = consumers.get(out, [])
        if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != out:
            continue
        b = users[0]
        if b.input[1] not in inits:
            continue
        group, wb = attr(b, "group", 1), inits[b.input[1]]
        if group == 1 or (group == wb.dims[0] and wb.dims[1] == 1):
            pairs.append((a, clip, b))
    return pairs


# -- the pass ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EqualizationConfig:
    relu6: str  # skip | exact | relu: how pairs behind ReLU6 are treated


@register
class Equalization(QuantPass[EqualizationConfig]):
    name = "equalization"
    order = 20

    def configure(self, stage_cfg: Any) -> EqualizationConfig | None:
        return EqualizationConfig(stage_cfg.equalization_relu6) if stage_cfg.equalization else None

    def run(self, state: QuantState, config: EqualizationConfig) -> None:
        assert state.prep is not None
        state.prep, pairs = equalize(state.prep, state.work / "prep_cle.onnx", relu6=config.relu6, reader=state.reader)
        state.metrics["equalized_pairs"] = pairs
