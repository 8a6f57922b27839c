"""Quantize stage: FP32 ONNX -> one INT8 QDQ file (or dynamic INT8 / FP16) that ORT, OpenVINO and
TensorRT all read, scored against FP32, with an accuracy-aware fallback that keeps the worst
layers in float until the recipe's target is met.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from pipeline.atomic import atomic_path
from pipeline.errors import BadInput
from pipeline.quantization.targets import Target
from pipeline.stages.base import Artifact, Stage, StageConfig, StageContext, StageResult
from pipeline.stages.export import FP32_NAME, ExportConfig, export_fp32

Backend = Literal["onnxruntime", "openvino"]


class FallbackConfig(StageConfig):
    max_accuracy_drop: float | None = Field(None, ge=0, le=1)  # absolute, e.g. 0.01 = 1 point
    min_agreement: float | None = Field(None, ge=0, le=1)  # top-1 agreement with FP32
    max_float_layers: int = Field(5, ge=0)
    max_steps: int = Field(5, ge=0)
    candidates: int = Field(3, ge=1)  # layers measured by ablation per step (ranked by the debugger)


class QuantizeConfig(StageConfig):
    mode: Literal["static", "dynamic", "fp16"] = "static"
    # the CPU/runtime the artifact is for; auto = this machine. x86-avx2 = safe on every x86-64 CPU
    target: Target = "auto"
    # nearest, or gptq: error-compensating rounding from calibration data (gptq.py), static mode only
    weight_rounding: Literal["nearest", "gptq"] = "nearest"
    # mse: per-tensor range search by quantization error (range_search.py) over min-max calibration
    calibration: Literal["minmax", "entropy", "percentile", "mse"] = "minmax"
    per_channel: bool = True
    samples: int = Field(256, gt=0)  # calibration samples, streamed batch by batch
    activation_type: Literal["quint8", "qint8"] = "quint8"  # U8S8: fastest on ORT VNNI and OpenVINO
    equalization: bool = False  # cross-layer equalization on the FP32 ONNX before calibration
    # pairs behind ReLU6: skip | exact (clip-aware, exact on calibration data) | relu (Nagel: Clip->Relu)
    equalization_relu6: Literal["skip", "exact", "relu"] = "exact"
    bias_correction: bool = True  # on by default: +3.5 to +6 points agreement measured, ~1 s; empirical bias correction for weight quantization error
    fallback: FallbackConfig = FallbackConfig()
    exclude: list[str] = Field(default_factory=list)  # ONNX node names or torch module paths kept float
    # layer families kept float from the start (with their fused activation and consumers)
    keep_float: list[Literal["first_conv", "last_conv", "classifier", "depthwise"]] = Field(default_factory=list)
    backends: list[Backend] = Field(default_factory=lambda: ["onnxruntime", "openvino"])
    eval_samples: int = Field(256, gt=0)
    debug_samples: int = Field(8, gt=0)  # samples for the per-tensor error analysis (holds activations)
    latency_iterations: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _fallback_can_be_judged(self) -> QuantizeConfig:
        """A fallback target is judged on this machine's kernels: refuse targets it cannot run."""
        from pipeline.quantization.targets import host_cpu, resolve

        judged = self.fallback.max_accuracy_drop is not None or self.fallback.min_agreement is not None
        target, host = resolve(self.target), host_cpu().target
        if judged and target in ("arm64", "tensorrt") and target != host:
            raise ValueError(f"target {target} cannot be measured on this {host} CPU, so fallback cannot "
                             f"judge it; remove the fallback target or run the recipe on {target}")
        return self


class QuantizeStage(Stage[QuantizeConfig]):
    name = "quantize"
    Config: ClassVar[type[StageConfig]] = QuantizeConfig
    description = "Quantize the ONNX model (static QDQ INT8, dynamic INT8 or FP16) with accuracy-aware fallback"

    def run(self, ctx: StageContext, cfg: QuantizeConfig) -> StageResult:
        result = StageResult(metrics={"mode": cfg.mode, "calibration": cfg.calibration if cfg.mode == "static" else None})
        if cfg.mode == "static" and len(ctx.data.require("calibration", "quantize")) == 0:
            raise BadInput("data.calibration: the split is empty; static INT8 needs calibration samples")
        fp32 = ctx.artifacts.get(FP32_NAME)
        if fp32 is not None:
            from pipeline.export.onnx import load_onnx

            load_onnx(fp32.path)  # a missing or corrupt file is BadInput naming the path
        else:
            fp32, export_metrics = export_fp32(ctx, ExportConfig())
            ctx.artifacts[FP32_NAME] = fp32
            result.artifacts[FP32_NAME] = fp32
            result.metrics["export"] = export_metrics
        fp32_path = Path(fp32.path)
        work = ctx.path("quantize/.keep").parent
        if cfg.mode == "fp16":
            name, art = "onnx_fp16", self._fp16(ctx, fp32_path)
        elif cfg.mode == "dynamic":
            name, art = "onnx_int8", self._dynamic(ctx, cfg, fp32_path, work)
        else:
            name, art = "onnx_int8", self._static(ctx, cfg, fp32_path, work, result.metrics)
        result.artifacts[name] = art
        ctx.artifacts[name] = art
        if cfg.mode != "static":
            result.metrics["fallback"] = {"steps": [], "float_layers": [], "note": "fallback applies to mode: static"}
            result.metrics["layer_errors"] = []
        self._measure(ctx, cfg, fp32_path, {name: art}, result.metrics)
        return result

    # -- modes -------------------------------------------------------------------------------
    def _fp16(self, ctx: StageContext, fp32_path: Path) -> Artifact:
        from pipeline.quantization.ort_quant import convert_fp16

        path = convert_fp16(fp32_path, ctx.path("model_fp16.onnx"))
        return Artifact(path, "onnx", "fp16", "FP16 weights and compute, float32 inputs/outputs")

    def _dynamic(self, ctx: StageContext, cfg: QuantizeConfig, fp32_path: Path, work: Path) -> Artifact:
        from pipeline.quantization.ort_quant import node_names, preprocess, quantize_dynamic_int8, resolve_exclude

        prep = preprocess(fp32_path, work / "prep.onnx")
        exclude = resolve_exclude(cfg.exclude, node_names(prep))
        path = quantize_dynamic_int8(prep, ctx.path("model_int8_dynamic.onnx"), per_channel=cfg.per_channel,
                                     exclude=exclude)
        return Artifact(path, "onnx", "int8", "dynamic INT8 (weights int8, activations quantized at run time)")

    def _static(self, ctx: StageContext, cfg: QuantizeConfig, fp32_path: Path, work: Path,
                metrics: dict[str, Any]) -> Artifact:
        from pipeline.backends import onnxruntime as ort_backend
        from pipeline.export.onnx import INPUT_NAME
        from pipeline.quantization import saturation
        from pipeline.quantization.calibration import StreamingReader
        from pipeline.quantization.debug import nodes_to_keep_float, tensor_errors
        from pipeline.quantization.evaluate import score
        from pipeline.quantization.fallback import run_fallback

        calib = ctx.data.require("calibration", "quantize")
        target = _target_plan(cfg)
        reader = StreamingReader(calib, INPUT_NAME, cfg.samples, uniform=cfg.calibration in ("entropy", "percentile"))
        prep, exclude = self._prepare(ctx, cfg, fp32_path, work, reader, metrics)
        with ctx.console.status(f"activation ranges per channel ({reader.samples_available()} samples)"):
            ranges = saturation.activation_ranges(prep, reader)
        quantize = _Quantizer(ctx, cfg, prep, work, reader, ranges, fix=target["overflow_fix"])
        eval_split = ctx.data.eval or calib
        reference = ort_backend.load(fp32_path, threads=ctx.threads)

        def evaluate(path: Path) -> dict[str, Any]:
            sess = ort_backend.load(path, threads=ctx.threads)
            try:
                return score(sess, reference, eval_split, cfg.eval_samples)
            finally:
                sess.close()

        debug_reader = StreamingReader(calib, INPUT_NAME, cfg.debug_samples, batch_size=cfg.debug_samples)
        fb = cfg.fallback
        try:
            first = quantize(exclude, "0")
            outcome = run_fallback(
                expand=lambda layer: nodes_to_keep_float(layer, prep), first=first, first_scores=evaluate(first),
                quantize=quantize, evaluate=evaluate, meets=lambda s: _meets(s, fb),
                errors=lambda p: tensor_errors(prep, p, debug_reader), base_exclude=exclude,
                max_float_layers=fb.max_float_layers, max_steps=fb.max_steps, candidates=fb.candidates)
        finally:
            reference.close()
            quantize.cache.unlink(missing_ok=True)  # the calibration cache serves this stage run only
        final = ctx.path("model_int8.onnx")
        with atomic_path(final) as tmp:
            shutil.copyfile(outcome.path, tmp)
        metrics["fallback"] = {"target": fb.model_dump(), "met": outcome.met, "steps": outcome.steps,
                               "chosen_step": outcome.chosen_step,
                               "float_layers": outcome.float_layers, "excluded_nodes": outcome.excluded_nodes}
        metrics["layer_errors"] = [t.to_dict() for t in tensor_errors(prep, final, debug_reader)[:10]]
        if quantize.range_search is not None:
            metrics["range_search"] = quantize.range_search
        if quantize.gptq is not None:
            metrics["gptq"] = quantize.gptq
        metrics["target"] = _report_target(ctx, target, saturation.check(final, ranges), quantize.seven_bit,
                                           quantize.widened.get(outcome.path, {}))
        if not outcome.met:
            ctx.console.print(f"[yellow]quantize: fallback target not met after {len(outcome.steps) - 1} steps; "
                              f"keeping step {outcome.chosen_step} ({len(outcome.float_layers)} layers in float)[/]")
        return Artifact(final, "onnx", "int8", f"static QDQ INT8 ({cfg.calibration}, "
                        f"{'per-channel' if cfg.per_channel else 'per-tensor'}), {len(outcome.excluded_nodes)} nodes float")

    def _prepare(self, ctx: StageContext, cfg: QuantizeConfig, fp32_path: Path, work: Path, reader: Any,
                 metrics: dict[str, Any]) -> tuple[Path, list[str]]:
        """Pre-process, the optional float-model passes, and the nodes kept float from the start."""
        from pipeline.quantization import ort_quant

        prep = ort_quant.preprocess(fp32_path, work / "prep.onnx")
        if cfg.equalization:
            from pipeline.quantization.equalization import equalize

            prep, pairs = equalize(prep, work / "prep_cle.onnx", relu6=cfg.equalization_relu6, reader=reader)
            metrics["equalized_pairs"] = pairs
        if cfg.bias_correction:
            from pipeline.quantization.bias_correction import correct_biases

            prep, corrected = correct_biases(prep, work / "prep_bc.onnx", reader, cfg.per_channel)
            metrics["bias_corrected_layers"] = corrected
        exclude = ort_quant.resolve_exclude(cfg.exclude, ort_quant.node_names(prep))
        if cfg.keep_float:
            from pipeline.quantization.debug import nodes_to_keep_float

            kept = ort_quant.keep_float_layers(prep, list(cfg.keep_float))
            exclude = list(dict.fromkeys(exclude + [n for k in kept for n in nodes_to_keep_float(k, prep)]))
            metrics["keep_float_layers"] = len(kept)
        return prep, exclude

    # -- measurements ------------------------------------------------------------------------
    def _measure(self, ctx: StageContext, cfg: QuantizeConfig, fp32_path: Path, made: dict[str, Artifact],
                 metrics: dict[str, Any]) -> None:
        from pipeline.backends import onnxruntime as ort_backend
        from pipeline.quantization.evaluate import backend_latencies, score

        split = ctx.data.eval or ctx.data.calibration
        x1 = np.ascontiguousarray(ctx.example_input[:1].detach().cpu().numpy(), dtype=np.float32)
        reference = ort_backend.load(fp32_path, threads=ctx.threads)
        entries: dict[str, Any] = {}
        try:
            for name, art in {"fp32": Artifact(fp32_path, "onnx", "fp32"), **made}.items():
                entry: dict[str, Any] = {"path": str(art.path), "size_bytes": Path(art.path).stat().st_size}
                if split is not None:
                    sess = ort_backend.load(art.path, threads=ctx.threads)
                    try:
                        s = score(sess, reference, split, cfg.eval_samples)
                    finally:
                        sess.close()
                    entry.update(accuracy=s["accuracy"], agreement=s["agreement"], max_abs_err=s["max_abs_err"],
                                 eval_samples=s["samples"])
                entry["latency_ms"], entry["backends"] = backend_latencies(
                    art.path, art.precision or "fp32", x1, list(cfg.backends), ctx.threads, cfg.latency_iterations)
                entries[name] = entry
        finally:
            reference.close()
        metrics["fp32"] = entries.pop("fp32")
        metrics["artifacts"] = entries
        for name, e in entries.items():
            lat = ", ".join(f"{b} {v:.2f} ms" for b, v in e["latency_ms"].items() if v is not None)
            agree = e.get("agreement")
            ctx.console.print(f"{name}: agreement {agree:.3f}, {lat}" if agree is not None else f"{name}: {lat}")


def _meets(scores: dict[str, Any], fb: FallbackConfig) -> bool:
    """Target check. Without labels a max_accuracy_drop is read as a minimum agreement of 1 - drop."""
    ok = True
    if fb.max_accuracy_drop is not None:
        if scores.get("accuracy") is not None and scores.get("reference_accuracy") is not None:
            ok &= scores["reference_accuracy"] - scores["accuracy"] <= fb.max_accuracy_drop + 1e-12
        else:
            ok &= (scores.get("agreement") or 0.0) >= 1 - fb.max_accuracy_drop
    if fb.min_agreement is not None:
        ok &= (scores.get("agreement") or 0.0) >= fb.min_agreement
    return bool(ok)


class _Quantizer:
    """`quantize(exclude, tag)` for the fallback: calibrates once (a cache file), and on targets whose
    kernels saturate int16 pairs widens the weight scales of the channels at risk (overflow_fix),
    so the artifact computes the same on every x86 CPU. Should widening not converge, those layers
    get 7-bit weights, which are safe by construction."""

    def __init__(self, ctx: StageContext, cfg: QuantizeConfig, prep: Path, work: Path, reader: Any,
                 ranges: dict[str, Any], fix: bool) -> None:
        import os

        self.ctx, self.cfg, self.prep, self.work, self.reader, self.ranges, self.fix = (
            ctx, cfg, prep, work, reader, ranges, fix)
        self.cache = work / f".calibration.{os.getpid()}.json"
        self.cache.unlink(missing_ok=True)
        self.seven_bit: dict[str, int] = {}  # float weight name -> channel axis
        self.widened: dict[Path, dict[str, Any]] = {}  # artifact -> {layer: channels widened}
        self.range_search: dict[str, Any] | None = None  # calibration: mse, what the search changed
        self.gptq: dict[str, Any] | None = None  # weight_rounding: gptq, output MSE per layer
        self._rounding_cache: dict[str, Any] = {}

    def __call__(self, nodes: list[str], tag: str) -> Path:
        from pipeline.quantization.overflow_fix import widen_scales

        path = self.work / f"int8_step{tag}.onnx"
        self._quantize(nodes, path)
        if self.cfg.weight_rounding == "gptq":
            from pipeline.quantization import gptq

            with self.ctx.console.status("error-compensating weight rounding (GPTQ)"):
                self.gptq = gptq.apply(path, self.prep, self.reader, self._rounding_cache,
                                       reference="nearest" if self.cfg.bias_correction else "float")
        if self.fix:
            self.widened[path], risky = widen_scales(path, self.prep, self.ranges)
            if risky:  # widening did not converge: 7-bit weights are safe by construction
                self.seven_bit.update({r.weight: r.weight_axis for r in risky})
                self._quantize(nodes, path)
        return path

    def _quantize(self, nodes: list[str], path: Path) -> None:
        from contextlib import nullcontext

        from pipeline.quantization import ort_quant

        cfg = self.cfg
        first = not self.cache.exists()
        status = (self.ctx.console.status(f"calibrating ({cfg.calibration}, {self.reader.samples_available()} samples)")
                  if first else nullcontext())
        with status:
            self.reader.rewind()
            ort_quant.quantize_static_qdq(
                self.prep, path, self.reader, calibration="minmax" if cfg.calibration == "mse" else cfg.calibration,
                per_channel=cfg.per_channel, exclude=nodes, activation_type=cfg.activation_type,
                seven_bit_weights=dict(self.seven_bit), calibration_cache=self.cache)
            if first and cfg.calibration == "mse":  # min-max wrote the cache: search ranges, then re-quantize
                from pipeline.quantization.range_search import refine_cache

                self.range_search = refine_cache(self.cache, self.prep, self.reader)
                self._quantize(nodes, path)


def _target_plan(cfg: QuantizeConfig) -> dict[str, Any]:
    """Resolve `target` (the config already refused a fallback target this machine cannot measure)."""
    from pipeline.quantization import targets

    resolved = targets.resolve(cfg.target)
    return {"requested": cfg.target, "resolved": resolved, "overflow_fix": targets.needs_overflow_fix(resolved)}


def _report_target(ctx: StageContext, plan: dict[str, Any], risks: list[Any], seven_bit: dict[str, int],
                   widened: dict[str, Any]) -> dict[str, Any]:
    """The target section of the metrics, and the console warnings a user must not miss."""
    from pipeline.quantization import saturation, targets

    summary = saturation.summary(risks)
    safe = summary["safe_without_vnni"]
    host = targets.host_cpu()
    measured = targets.measurable_here(plan["resolved"], safe, host.target)
    if not safe:
        ctx.console.print(f"[yellow]quantize: this INT8 artifact can saturate int16 on x86 CPUs without VNNI "
                          f"(AVX2, AVX-512F) and lose accuracy there; layers at risk: "
                          f"{', '.join(summary['layers_at_risk'][:6])}. Set quantize.target: x86-avx2 to make it "
                          f"safe on every x86 CPU.[/]")
    if not measured:
        ctx.console.print(f"[yellow]quantize: accuracy was measured on this {host.target} CPU; on target "
                          f"{plan['resolved']} it is not measured here[/]")
    return {"requested": plan["requested"], "resolved": plan["resolved"], "host": host.to_dict(),
            "measured_on_target": measured, "seven_bit_weights": sorted(seven_bit),
            "widened_channels": widened,
            "safe_on": [t for t in ("x86-avx2", "x86-vnni", "x86-amx") if safe or targets.KERNELS[t] == "int32"],
            "saturation": summary}

