"""Thin wrappers over onnxruntime.quantization: pre-process, static QDQ, dynamic, and FP16.

Static settings (measured in benchmarks/quantize.py, see docs/stages/quantize.md): QDQ format,
symmetric per-channel QInt8 weights, asymmetric QUInt8 activations. U8S8 is the layout both ORT's
x86 VNNI kernels and OpenVINO's CPU plugin accelerate; ORT's own default (S8S8) is slower there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_path
from pipeline.errors import BadInput, StageFailed
from dataclasses import dataclass
from pipeline.quantization.passes import QuantPass, QuantState, register

def preprocess(fp32_path: Path, out_path: Path) -> Path:
    """quant_pre_process: symbolic shape inference + ORT basic graph optimisation, as ORT advises."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with atomic_path(out_path) as tmp:
        try:
            quant_pre_process(str(fp32_path), str(tmp), skip_symbolic_shape=False)
        except Exception:  # symbolic shape inference fails on some exotic graphs: retry without it
            quant_pre_process(str(fp32_path), str(tmp), skip_symbolic_shape=True)
    return out_path


def quantize_static_qdq(prep_path: Path, out_path: Path, reader: Any, *, calibration: str = "minmax",
                        per_channel: bool = True, exclude: list[str] | None = None,
                        activation_type: str = "quint8", weight_type: str = "qint8",
                        extra_options: dict[str, Any] | None = None,
                        seven_bit_weights: dict[str, int] | None = None,
                        calibration_cache: Path | None = None) -> Path:
    """Static INT8 QDQ quantization of an already pre-processed model; `reader` streams calibration.

    `seven_bit_weights` maps float weight names to their channel axis: those weights get 7-bit
    codes (onnxruntime's `reduce_range`, per tensor), the overflow-safe treatment for kernels that
    saturate int16 pairs. `calibration_cache` (a JSON path) calibrates once and reuses the ranges
    on every later call with the same path: the fallback re-quantizes many times.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibration]
    qtype = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}
    # Gemm outputs stay float: a CNN's only Gemm is usually the classifier, and 8-bit logits flip
    # near-tie top-1 decisions for no speed gain (a following quantized op re-quantizes its input).
    # Signed activations are made symmetric (zero point 0): that is what TensorRT's explicit
    # quantization accepts, and U8 activations keep the asymmetric range that VNNI kernels like.
    options = {"WeightSymmetric": True, "ActivationSymmetric": activation_type == "qint8",
               "OpTypesToExcludeOutputQuantization": ["Gemm"]}
    if calibration == "percentile":
        options["CalibPercentile"] = 99.999
    options.update(extra_options or {})
    if seven_bit_weights:
        overrides = dict(options.get("TensorQuantOverrides", {}))
        for name, axis in seven_bit_weights.items():
            overrides[name] = [{"reduce_range": True, **({"axis": axis} if per_channel else {})}]
        options["TensorQuantOverrides"] = overrides
    with atomic_path(out_path) as tmp:
        try:
            quantize_static(str(prep_path), str(tmp), reader, quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=qtype[activation_type],
                            weight_type=qtype[weight_type], nodes_to_exclude=list(exclude or []),
                            calibrate_method=method, extra_options=options,
                            calibration_cache_path=None if calibration_cache is None else str(calibration_cache))
        except (ValueError, RuntimeError) as exc:
            raise StageFailed(f"onnxruntime quantize_static failed: {exc}") from exc
    return out_path


def quantize_dynamic_int8(prep_path: Path, out_path: Path, *, per_channel: bool = True,
                          exclude: list[str] | None = None) -> Path:
    """Dynamic INT8 (weights quantized, activation ranges computed at run time): no calibration."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_path(out_path) as tmp:
        quantize_dynamic(str(prep_path), str(tmp), per_channel=per_channel, weight_type=QuantType.QInt8,
                         nodes_to_exclude=list(exclude or []))
    return out_path


def convert_fp16(fp32_path: Path, out_path: Path) -> Path:
    """FP16 weights and compute with float32 inputs/outputs kept (keep_io_types), via ORT's converter."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    with atomic_path(out_path) as tmp:
        onnx.save(model, str(tmp))
    return out_path


def node_names(path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node]


def resolve_exclude(names: list[str], nodes: list[str]) -> list[str]:
    """Map user names to ONNX node names: exact node names, or torch module paths such as
    `layer1.0.conv1` (matching exporter scopes `/layer1/layer1.0/conv1/...`). Unknown -> BadInput."""
    resolved: list[str] = []
    for name in names:
        if name in nodes:
            resolved.append(name)
            continue
        parts = name.split(".")
        scope = "/" + "/".join(".".join(parts[: i + 1]) for i in range(len(parts))) + "/"
        hits = [n for n in nodes if n.startswith(scope)]
        if not hits:
            raise BadInput(f"quantize.exclude: '{name}' matches no ONNX node or module "
                           f"(examples: {', '.join(nodes[:5])})")
        resolved.extend(hits)
    return list(dict.fromkeys(resolved))


KEEP_FLOAT_PRESETS = ("first_conv", "last_conv", "classifier", "depthwise")


def keep_float_layers(path: Path, presets: list[str]) -> list[str]:
    """Layers named by presets: `first_conv`/`last_conv` (graph order), `classifier` (last
    Gemm/MatMul), `depthwise` (every Conv with one input channel per group). Layers, not nodes:
    debug.nodes_to_keep_float adds the fused activation and consumers of each."""
    import onnx

    from pipeline.quantization.graph import attr, index

    graph = onnx.load(str(path), load_external_data=False).graph
    inits, _, _ = index(graph)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    picked: list[str] = []
    for preset in presets:
        if preset == "first_conv":
            picked += [n.name for n in convs[:1]]
        elif preset == "last_conv":
            picked += [n.name for n in convs[-1:]]
        elif preset == "classifier":
            picked += [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")][-1:]
        elif preset == "depthwise":
            picked += [n.name for n in convs if attr(n, "group", 1) > 1 and n.input[1] in inits
                       and inits[n.input[1]].dims[1] == 1]
        else:
            raise BadInput(f"quantize.keep_float: unknown preset '{preset}' (use {', '.join(KEEP_FLOAT_PRESETS)})")
    return list(dict.fromkeys(picked))


# -- the pass ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreprocessConfig:
    pass


@register
class Preprocess(QuantPass[PreprocessConfig]):
    name = "preprocess"
    order = 10

    def configure(self, stage_cfg: Any) -> PreprocessConfig:
        return PreprocessConfig()

    def run(self, state: QuantState, config: PreprocessConfig) -> None:
        state.prep = preprocess(state.fp32, state.work / "prep.onnx")
