"""Per-tensor quantization error, via onnxruntime.quantization.qdq_loss_debug, mapped to layers.

Both models are augmented to expose every float tensor, run on a few calibration batches, and
compared. `sqnr_db` is the library's float-vs-quantized-model SQNR at that tensor (accumulated);
`local_err` is the per-channel relative error a layer adds on top of its inputs' (the blame).
Weights are compared too. The
layer held responsible for an activation is its producing Conv/Gemm (walking back through
Relu/Clip, which the quantizer folds into the producer's output range).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pipeline.quantization.passes import QuantPass, QuantState, register

_PASS_THROUGH = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "BatchNormalization"}


@dataclass
class TensorError:
    tensor: str
    kind: str  # "activation" or "weight"
    sqnr_db: float  # float model vs quantized model at this tensor (accumulated); weights: vs dequantized
    channel_rel_err: float  # mean over channels of ||f_c - q_c|| / ||f_c||: sees crushed small channels
    local_err: float  # channel_rel_err minus the worst of the layer's inputs: the error this layer adds
    layer: str | None  # the float-model node held responsible

    @property
    def rel_err(self) -> float:
        return 10 ** (-self.sqnr_db / 20) if math.isfinite(self.sqnr_db) else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "kind": self.kind, "layer": self.layer, "sqnr_db": _r(self.sqnr_db),
                "rel_err": _r(self.rel_err, 6), "channel_rel_err": _r(self.channel_rel_err, 6),
                "local_err": _r(self.local_err, 6)}


def _r(v: float, nd: int = 3) -> float | None:
    return round(v, nd) if math.isfinite(v) else None


def _channel_rel_err(f: list[Any], q: list[Any], channels: int | None, batches: list[int]) -> float:
    """Mean per-channel relative error. Energy-weighted SQNR hides an outlier channel that crushes
    all others under per-tensor activation scales; averaging over channels exposes it."""
    errs = []
    for fa, qa, n in zip(f, q, batches):
        c = channels if channels and fa.size % (n * channels) == 0 else 1
        fa, qa = fa.reshape(n, c, -1).astype(np.float64), qa.reshape(n, c, -1).astype(np.float64)
        num = np.sqrt(((fa - qa) ** 2).sum(axis=(0, 2)))
        den = np.sqrt((fa**2).sum(axis=(0, 2)))
        live = den > 1e-6 * max(float(den.max()), 1e-30)
        errs.append(np.minimum(num[live] / den[live], 1.0) if live.any() else np.zeros(1))
    return float(np.concatenate(errs).mean()) if errs else 0.0


def tensor_errors(float_path: Path, qdq_path: Path, reader: Any) -> list[TensorError]:
    """All tensor errors, worst local error first. `reader` must support rewind()."""
    from onnxruntime.quantization import qdq_loss_debug as dbg

    with tempfile.TemporaryDirectory(prefix="fmap-qdebug-") as tmp:
        f_aug, q_aug = Path(tmp) / "float_aug.onnx", Path(tmp) / "qdq_aug.onnx"
        dbg.modify_model_output_intermediate_tensors(str(float_path), str(f_aug))
        dbg.modify_model_output_intermediate_tensors(str(qdq_path), str(q_aug))
        reader.rewind()
        batches = [int(next(iter(feed.values())).shape[0]) for feed in iter(reader.get_next, None)]
        reader.rewind()
        float_acts = dbg.collect_activations(str(f_aug), reader)
        reader.rewind()
        qdq_acts = dbg.collect_activations(str(q_aug), reader)
        reader.rewind()
    matching = dbg.create_activation_matching(qdq_acts, float_acts)
    act_err = dbg.compute_activation_error(matching)
    w_match = dbg.create_weight_matching(str(float_path), str(qdq_path))
    w_err = dbg.compute_weight_error(w_match)

    model = dbg.load_model_with_shape_infer(Path(float_path))
    graph = model.graph
    channels = {v.name: _dim1(v) for v in [*graph.value_info, *graph.input, *graph.output]}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    ch_err = {name: _channel_rel_err(m["float"], m["post_qdq"], channels.get(name), batches)
              for name, m in matching.items() if m.get("float") is not None and m.get("post_qdq") is not None}
    out: list[TensorError] = []
    for name, e in act_err.items():
        err = ch_err.get(name, 0.0)
        upstream = [ch_err.get(i, 0.0) for i in _layer_inputs(name, producer)]
        out.append(TensorError(name, "activation", e.get("xmodel_err", e["qdq_err"]), err,
                               err - max(upstream, default=0.0), _responsible(name, producer, consumers)))
    for name, sqnr in w_err.items():
        users = consumers.get(name, [])
        m = w_match[name]
        err = _channel_rel_err([m["float"]], [m["dequantized"]], m["float"].shape[0], [1])
        out.append(TensorError(name, "weight", sqnr, err, err, users[0].name if users else None))
    out.sort(key=lambda t: -t.local_err)
    return out


def _dim1(value_info: Any) -> int | None:
    dims = value_info.type.tensor_type.shape.dim
    return int(dims[1].dim_value) if len(dims) >= 2 and dims[1].dim_value > 0 else None


def _layer_inputs(tensor: str, producer: dict[str, Any]) -> list[str]:
    """Activation inputs of the layer (through fused pass-through ops) that produced `tensor`."""
    node = producer.get(tensor)
    while node is not None and node.op_type in _PASS_THROUGH and node.input and node.input[0] in producer:
        node = producer[node.input[0]]
    return [] if node is None else [i for i in node.input if i]


def _responsible(tensor: str, producer: dict[str, Any], consumers: dict[str, list[Any]]) -> str | None:
    node = producer.get(tensor)
    while node is not None and node.op_type in _PASS_THROUGH and node.input and node.input[0] in producer:
        node = producer[node.input[0]]
    if node is not None:
        return node.name
    users = consumers.get(tensor, [])  # a graph input: blame its first consumer
    return users[0].name if users else None


def nodes_to_keep_float(layer: str, float_path: Path) -> list[str]:
    """The nodes to exclude so `layer`'s output stays float end to end: the layer, the activations
    the quantizer fuses into it, and every consumer of the resulting tensor (a quantized consumer
    would re-quantize the tensor at its input)."""
    import onnx

    graph = onnx.load(str(float_path), load_external_data=False).graph
    by_name = {n.name: n for n in graph.node}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    if layer not in by_name:
        return [layer]
    chain = [by_name[layer]]
    while True:
        users = consumers.get(chain[-1].output[0], [])
        if len(users) == 1 and users[0].op_type in _PASS_THROUGH:
            chain.append(users[0])
        else:
            break
    keep = [n.name for n in chain] + [u.name for u in consumers.get(chain[-1].output[0], [])]
    return list(dict.fromkeys(keep))


# -- the pass ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeepFloatConfig:
    exclude: tuple[str, ...]
    families: tuple[str, ...]


@register
class KeepFloat(QuantPass[KeepFloatConfig]):
    name = "keep_float"
    order = 40

    def configure(self, stage_cfg: Any) -> KeepFloatConfig:
        return KeepFloatConfig(tuple(stage_cfg.exclude), tuple(stage_cfg.keep_float))

    def run(self, state: QuantState, config: KeepFloatConfig) -> None:
        from pipeline.quantization import ort_quant

        assert state.prep is not None
        exclude = ort_quant.resolve_exclude(list(config.exclude), ort_quant.node_names(state.prep))
        if config.families:
            kept = ort_quant.keep_float_layers(state.prep, list(config.families))
            exclude = list(dict.fromkeys(exclude + [n for k in kept for n in nodes_to_keep_float(k, state.prep)]))
            state.metrics["keep_float_layers"] = len(kept)
        state.exclude = exclude
