"""Build TensorRT engines from the pipeline's ONNX artifacts, or skip visibly where TensorRT can't run.

FP16 engines come from "onnx_fp32"; INT8 engines from the QDQ model "onnx_int8" (explicit
quantization: TensorRT 10 deprecated implicit calibration, TensorRT 11 removed it), so the scales
the quantize stage chose are the ones the engine uses and no calibrator runs here.

TensorRT 11 also removed the FP16/INT8 builder flags ("weak typing"). Where they are gone, the
network is built strongly typed instead: the FP16 engine from an FP16 copy of the ONNX model, the
INT8 engine from the QDQ model as-is. `metrics["tensorrt"]["typing"]` says which path ran.

`build_engine_set(cfg, artifacts, work_dir, example_shape, console)` takes plain inputs; the export
stage calls it after its ONNX export and `pipeline.stages.tensorrt.TensorRTStage` runs it as a stage
of its own (e.g. after quantize).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from rich.console import Console
from rich.markup import escape

from pipeline.atomic import write_bytes, write_json, write_text
from pipeline.errors import BadInput, StageFailed
from pipeline.contracts import Artifact, StageConfig, StageResult

EnginePrecision = Literal["fp16", "int8"]
SOURCE_ARTIFACT: dict[str, str] = {"fp16": "onnx_fp32", "int8": "onnx_int8"}
MAX_LISTED_MISMATCHES = 50  # metrics stay small; the full layer list is in the *_layers.json artifact
# Layers that move or describe data rather than compute it: their precision says nothing useful.
NON_COMPUTE_LAYERS = frozenset({"Reformat", "NoOp", "Constant", "Shape", "Identity"})


class TensorRTConfig(StageConfig):
    """Engine build options. `best` builds both engines; its INT8 engine may use FP16 off the Q/DQ path."""

    precision: Literal["fp16", "int8", "best"] = "fp16"
    workspace_mb: int = Field(1024, ge=16, description="builder scratch memory (MemoryPoolType.WORKSPACE)")
    max_batch: int = Field(8, ge=1, description="largest batch of the dynamic-batch optimisation profile")
    opt_batch: int = Field(1, ge=1, description="batch size TensorRT tunes tactics for")
    timing_cache: bool = Field(True, description="load/save tactic timings in the run dir: faster rebuilds")
    require: bool = Field(False, description="fail the run (exit 3) instead of skipping where TensorRT can't run")

    @model_validator(mode="after")
    def _opt_within_max(self) -> TensorRTConfig:
        if self.opt_batch > self.max_batch:
            raise ValueError(f"opt_batch ({self.opt_batch}) must not exceed max_batch ({self.max_batch})")
        return self

    def engine_precisions(self) -> list[EnginePrecision]:
        return ["fp16", "int8"] if self.precision == "best" else [self.precision]  # type: ignore[list-item]


def tensorrt_unavailable_reason() -> str | None:
    """None when engines can be built here; else why not ("no CUDA device", missing package...)."""
    from pipeline.backends.tensorrt import available

    return available()


# --------------------------------------------------------------------------- ONNX preparation

def qdq_incompatibility(onnx_path: Path) -> str | None:
    """Why TensorRT cannot take this quantized ONNX model, or None when it can.

    TensorRT's explicit quantization wants QDQ format with signed, symmetric INT8 (zero point 0).
    onnxruntime's defaults (uint8 activations, asymmetric) or QOperator format (QLinearConv...)
    fail deep inside the parser; this says so up front and names the quantize setting to change.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    qop = sorted({n.op_type for n in model.graph.node if n.op_type.startswith("QLinear") or n.op_type.startswith("QGemm")})
    if qop:
        return f"QOperator-format model ({', '.join(qop)}); TensorRT needs QDQ format (quantize format: qdq)"
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        return "model has no QuantizeLinear/DequantizeLinear nodes: not an explicitly quantized model"
    for node in qdq:
        if len(node.input) < 3 or not node.input[2]:
            continue  # no zero point: int8, zero, as TensorRT wants
        zp = inits.get(node.input[2])
        if zp is None:
            continue  # computed at run time; let the parser judge
        if zp.data_type == onnx.TensorProto.UINT8:
            return (f"node {node.name or node.output[0]} quantizes to uint8; TensorRT needs signed int8 "
                    "(quantize with int8 activations and weights)")
        if zp.data_type == onnx.TensorProto.INT8 and numpy_helper.to_array(zp).any():
            return (f"node {node.name or node.output[0]} has a non-zero zero point; TensorRT needs symmetric "
                    "INT8 quantization (quantize with symmetric activations)")
    return None


def onnx_to_fp16(src: Path, dst: Path) -> Path:
    """Write an FP16 copy of `src` with float32 inputs/outputs (for strongly typed FP16 builds):
    the same conversion as the quantize stage's fp16 mode."""
    from pipeline.quantization.ort_quant import convert_fp16

    return convert_fp16(src, dst)


# --------------------------------------------------------------------------- engine inspection

def _tensor_precision(fmt: str) -> str:
    """'Channel major FP16 format where channel % 8 == 0' -> 'fp16' (EngineInspector's wording)."""
    text = fmt.lower()
    for token, name in (("int8", "int8"), ("fp8", "fp8"), ("fp16", "fp16"), ("half", "fp16"), ("bf16", "bf16"),
                        ("fp32", "fp32"), ("float", "fp32"), ("int32", "int32"), ("int64", "int64"), ("bool", "bool")):
        if token in text:
            return name
    return "unknown"


def layer_precisions(engine_info_json: str) -> list[dict[str, Any]]:
    """Each layer's name, type and the precision it computes in (that of its first input tensor).

    Needs an engine built with ProfilingVerbosity.DETAILED; with less detail layers are bare
    names and come back with precision 'unknown'.
    """
    info = json.loads(engine_info_json)
    layers = info.get("Layers", []) if isinstance(info, dict) else info
    out: list[dict[str, Any]] = []
    for layer in layers:
        if not isinstance(layer, dict):
            out.append({"name": str(layer), "type": "unknown", "precision": "unknown"})
            continue
        tensors = layer.get("Inputs") or layer.get("Outputs") or []
        fmt = tensors[0].get("Format/Datatype", "") if tensors and isinstance(tensors[0], dict) else ""
        out.append({"name": layer.get("Name", "?"), "type": layer.get("LayerType", "unknown"),
                    "precision": _tensor_precision(fmt) if fmt else "unknown"})
    return out


def precision_mismatches(layers: list[dict[str, Any]], requested: str) -> list[dict[str, Any]]:
    """Compute layers that TensorRT ran in a precision other than `requested` (fp16 or int8)."""
    ignored = {"int32", "int64", "bool", "unknown", requested}
    return [layer for layer in layers if layer["type"] not in NON_COMPUTE_LAYERS and layer["precision"] not in ignored]


# --------------------------------------------------------------------------- building

def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps INFO-and-worse lines for the build log artifact."""

    class CaptureLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.INFO):
                self.lines.append(f"[{getattr(severity, 'name', severity)}] {msg}")

    return CaptureLogger()


def _strongly_typed(trt: Any) -> bool:
    """Weak typing (FP16/INT8 builder flags) where it still exists, else strongly typed networks."""
    return not hasattr(trt.BuilderFlag, "FP16")


def _build_engine(trt: Any, onnx_path: Path, precision: EnginePrecision, cfg: TensorRTConfig,
                  example_shape: tuple[int, ...], cache_path: Path | None, mixed: bool) -> dict[str, Any]:
    """Parse, configure, build one engine; return plan bytes, log lines, layer info, batch range."""
    logger = _make_logger(trt)
    strong = _strongly_typed(trt)
    builder = trt.Builder(logger)
    flags = (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) if strong else 0
    network = builder.create_network(flags)  # TensorRT 10+: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StageFailed(f"TensorRT could not parse {onnx_path.name}: {errors or 'see build log'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # EngineInspector needs per-layer formats
    if not strong:
        if precision == "fp16" or mixed:
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ scales come from the model: no calibrator

    batch_range: list[int] | None = None
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = [int(d) for d in tensor.shape]
        if -1 not in dims:
            continue
        if dims[0] != -1 and -1 in dims[1:]:
            raise StageFailed(f"input {tensor.name} has dynamic non-batch dims {dims}; export with a static image size")
        rest = [d if d != -1 else int(example_shape[j]) for j, d in enumerate(dims)][1:]
        profile.set_shape(tensor.name, [1, *rest], [cfg.opt_batch, *rest], [cfg.max_batch, *rest])
        batch_range = [1, cfg.opt_batch, cfg.max_batch]
    if batch_range is not None:
        config.add_optimization_profile(profile)

    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.exists() else b"")
    config.set_timing_cache(cache, False)

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - start
    if plan is None:
        tail = " | ".join(line for line in logger.lines[-5:] if "ERROR" in line) or "see build log"
        raise StageFailed(f"TensorRT failed to build the {precision} engine from {onnx_path.name}: {tail}")
    plan_bytes = bytes(plan)

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return {
        "plan": plan_bytes,
        "timing_cache": bytes(config.get_timing_cache().serialize()) if cache_path else None,
        "log": logger.lines,
        "engine_info": info,
        "build_s": build_s,
        "batch_range": batch_range,
        "static_shape": None if batch_range else [int(d) for d in network.get_input(0).shape],
    }


def _source_for(precision: EnginePrecision, artifacts: Mapping[str, Artifact]) -> tuple[Path | None, str | None]:
    """The ONNX file an engine is built from, or the reason it cannot be built."""
    name = SOURCE_ARTIFACT[precision]
    art = artifacts.get(name)
    if art is None:
        hint = "run quantize (format qdq) before this build" if precision == "int8" else "export onnx first"
        return None, f"no {name} artifact ({hint})"
    if not Path(art.path).is_file():
        return None, f"{name} artifact missing on disk: {art.path}"
    if precision == "int8":
        bad = qdq_incompatibility(Path(art.path))
        if bad:
            return None, bad
    return Path(art.path), None


def _skip(console: Console, cfg: TensorRTConfig, reason: str) -> StageResult:
    if cfg.require:
        raise StageFailed(f"tensorrt is required (require: true) but was not built: {reason}")
    console.print(f"[yellow]skipped[/] tensorrt: {escape(reason)}")
    return StageResult.skipped(reason, tensorrt={"status": "skipped", "reason": reason})


def build_engine_set(cfg: TensorRTConfig, artifacts: Mapping[str, Artifact], work_dir: Path,
                     example_shape: tuple[int, ...], console: Console) -> StageResult:
    """Build the engines `cfg.precision` asks for from the ONNX `artifacts` into `work_dir`.

    Without a GPU or the tensorrt package the result is status "skipped" with the reason, unless
    `cfg.require` (then StageFailed, exit 3). `example_shape` fills dynamic non-batch dims.
    """
    reason = tensorrt_unavailable_reason()
    if reason:
        return _skip(console, cfg, reason)
    if not any(name in artifacts for name in SOURCE_ARTIFACT.values()):
        raise BadInput("tensorrt needs an ONNX model: put export with onnx (and/or quantize) before it")

    import tensorrt as trt

    work_dir.mkdir(parents=True, exist_ok=True)
    cache_path = work_dir / "timing.cache" if cfg.timing_cache else None
    engines: dict[str, Any] = {}
    made: dict[str, Artifact] = {}
    for precision in cfg.engine_precisions():
        src, why = _source_for(precision, artifacts)
        if src is None:
            if cfg.require:
                raise StageFailed(f"tensorrt {precision} engine required but not buildable: {why}")
            console.print(f"[yellow]skipped[/] tensorrt {precision}: {escape(str(why))}")
            engines[precision] = {"status": "skipped", "reason": why}
            continue
        engines[precision] = _engine(trt, src, precision, cfg, work_dir, example_shape, cache_path, console, made)
    if cache_path is not None and cache_path.exists():
        made["trt_timing_cache"] = Artifact(cache_path, "other", None, "TensorRT timing cache")
    return _result(trt, engines, made)


def _engine(trt: Any, src: Path, precision: EnginePrecision, cfg: TensorRTConfig, work_dir: Path,
            example_shape: tuple[int, ...], cache_path: Path | None, console: Console,
            made: dict[str, Artifact]) -> dict[str, Any]:
    """Build one engine, write it with its log and layer list (added to `made`); its metrics."""
    if _strongly_typed(trt) and precision == "fp16":
        src = onnx_to_fp16(src, work_dir / "model_fp16.onnx")
    with console.status(f"building TensorRT {precision} engine from {src.name}"):
        built = _build_engine(trt, src, precision, cfg, example_shape, cache_path, mixed=cfg.precision == "best")
    key = f"trt_{precision}"
    engine_path = write_bytes(work_dir / f"model_{precision}.engine", built["plan"])
    log_path = write_text(work_dir / f"model_{precision}.build.log", "\n".join(built["log"]) + "\n")
    layers = layer_precisions(built["engine_info"])
    layers_path = write_json(work_dir / f"model_{precision}.layers.json",
                             {"requested": precision, "layers": layers, "engine": json.loads(built["engine_info"])})
    if built["timing_cache"] is not None and cache_path is not None:
        write_bytes(cache_path, built["timing_cache"])
    mismatched = precision_mismatches(layers, precision)
    made[key] = Artifact(engine_path, "tensorrt", precision, f"TensorRT {trt.__version__} {precision} engine")
    made[f"{key}_log"] = Artifact(log_path, "log", None, f"TensorRT {precision} build log")
    made[f"{key}_layers"] = Artifact(layers_path, "other", None, "per-layer precision (EngineInspector)")
    console.print(f"tensorrt {precision}: {len(layers)} layers, {len(mismatched)} not in {precision}, "
                  f"built in {built['build_s']:.1f}s")
    return {
        "status": "ok",
        "source": SOURCE_ARTIFACT[precision],
        "build_s": round(built["build_s"], 3),
        "size_mb": round(engine_path.stat().st_size / 2**20, 3),
        "batch_range": built["batch_range"],
        "static_shape": built["static_shape"],
        "layers": len(layers),
        "precision_counts": dict(Counter(layer["precision"] for layer in layers)),
        "mismatched_count": len(mismatched),
        "mismatched_layers": mismatched[:MAX_LISTED_MISMATCHES],
    }


def _result(trt: Any, engines: dict[str, Any], made: dict[str, Artifact]) -> StageResult:
    import torch

    metrics = {"tensorrt": {"status": "ok" if made else "skipped", "version": trt.__version__,
                            "device": torch.cuda.get_device_name(),
                            "typing": "strong" if _strongly_typed(trt) else "weak", "engines": engines}}
    if not any(e["status"] == "ok" for e in engines.values()):
        reasons = "; ".join(f"{p}: {e['reason']}" for p, e in engines.items())
        metrics["tensorrt"]["reason"] = reasons
        return StageResult(metrics=metrics, status="skipped", skip_reason=reasons)
    return StageResult(metrics=metrics, artifacts=made)
