"""Quantize stage: FP32 ONNX -> one INT8 QDQ file (or dynamic INT8 / FP16) that ORT, OpenVINO and
TensorRT all read, scored against FP32, with an accuracy-aware fallback that keeps the worst
layers in float until the recipe's target is met.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from pipeline.atomic import atomic_path
from pipeline.errors import BadInput
from pipeline.quantization.qat import QatConfig
from pipeline.quantization.targets import Target
from pipeline.stages.base import Artifact, Stage, StageConfig, StageContext, StageResult
from pipeline.stages.export import FP32_NAME


class FallbackConfig(StageConfig):
    max_accuracy_drop: float | None = Field(None, ge=0, le=1)  # absolute, e.g. 0.01 = 1 point
    min_agreement: float | None = Field(None, ge=0, le=1)  # top-1 agreement with FP32
    max_float_layers: int = Field(5, ge=0)
    max_steps: int = Field(5, ge=0)
    candidates: int = Field(3, ge=1)  # layers measured by ablation per step (ranked by the debugger)


class QuantizeConfig(StageConfig):
    mode: Literal["static", "dynamic", "fp16"] = "static"
    # ptq: post-training (calibrate, round); qat: then fine-tune the torch model through the same
    # rounding by distillation on unlabelled images (quantization/qat.py; budget in `qat`)
    method: Literal["ptq", "qat"] = "ptq"
    qat: QatConfig = QatConfig()
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
    backends: list[str] = Field(default_factory=lambda: ["onnxruntime", "openvino"])  # any registered backend
    eval_samples: int = Field(256, gt=0)
    debug_samples: int = Field(8, gt=0)  # samples for the per-tensor error analysis (holds activations)
    latency_iterations: int = Field(20, ge=1)

    @field_validator("backends")
    @classmethod
    def _registered(cls, v: list[str]) -> list[str]:
        """Built-in or plug-in backends (pipeline.backends registry) time the stage's own files."""
        from pipeline.backends import registered_names

        return registered_names(v)

    @model_validator(mode="after")
    def _qat_combines(self) -> QuantizeConfig:
        """QAT learns the weights the file rounds: it needs static mode, and the PTQ-only weight
        transforms (equalization rescales them, GPTQ re-rounds them) would be undone or fought."""
        if self.method == "qat":
            if self.mode != "static":
                raise ValueError("method: qat needs mode: static")
            if self.equalization:
                raise ValueError("method: qat does not combine with equalization: true (QAT trains the weights "
                                 "equalization would rescale); set equalization: false")
            if self.weight_rounding == "gptq":
                raise ValueError("method: qat does not combine with weight_rounding: gptq (QAT trains weights for "
                                 "nearest rounding); set weight_rounding: nearest")
        return self

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

    def requires(self, cfg: QuantizeConfig) -> tuple[str, ...]:
        return (FP32_NAME,)

    def produces(self, cfg: QuantizeConfig) -> tuple[str, ...]:
        return ("onnx_fp16",) if cfg.mode == "fp16" else ("onnx_int8",)

    def run(self, ctx: StageContext, cfg: QuantizeConfig) -> StageResult:
        result = StageResult(metrics={"mode": cfg.mode, "calibration": cfg.calibration if cfg.mode == "static" else None})
        if cfg.mode == "static" and len(ctx.data.require("calibration", "quantize")) == 0:
            raise BadInput("data.calibration: the split is empty; static INT8 needs calibration samples")
        fp32 = ctx.artifacts.get(FP32_NAME)
        if fp32 is None:  # validate refuses such recipes; this guards direct calls
            raise BadInput(f"quantize needs the {FP32_NAME} artifact: put an export stage before it")
        from pipeline.export.onnx import load_onnx

        load_onnx(fp32.path)  # a missing or corrupt file is BadInput naming the path
        fp32_path = Path(fp32.path)
        work = ctx.path("quantize/.keep").parent
        if cfg.mode == "fp16":
            name, art = "onnx_fp16", self._fp16(ctx, fp32_path)
        elif cfg.mode == "dynamic":
            name, art = "onnx_int8", self._dynamic(ctx, cfg, fp32_path, work)
        else:
            name, art = "onnx_int8", self._static(ctx, cfg, fp32_path, work, result.metrics)
        result.artifacts[name] = art
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
        """The pass chain (pipeline.quantization.passes), then the chosen file and what it means."""
        from pipeline.backends import onnxruntime as ort_backend
        from pipeline.export.onnx import INPUT_NAME
        from pipeline.quantization import saturation
        from pipeline.quantization.calibration import StreamingReader
        from pipeline.quantization.debug import tensor_errors
        from pipeline.quantization.evaluate import score
        from pipeline.quantization.passes import QuantState, run_chain

        calib = ctx.data.require("calibration", "quantize")
        eval_split = ctx.data.eval or calib
        with ort_backend.load(fp32_path, threads=ctx.threads) as reference:

            def evaluate(path: Path) -> dict[str, Any]:
                with ort_backend.load(path, threads=ctx.threads) as sess:
                    return score(sess, reference, eval_split, cfg.eval_samples)

            state = QuantState(
                cfg=cfg, fp32=fp32_path, work=work, console=ctx.console, evaluate=evaluate, metrics=metrics,
                reader=StreamingReader(calib, INPUT_NAME, cfg.samples,
                                       uniform=cfg.calibration in ("entropy", "percentile")),
                debug_reader=StreamingReader(calib, INPUT_NAME, cfg.debug_samples, batch_size=cfg.debug_samples),
                model=ctx.model if cfg.method == "qat" else None, train=ctx.data.train or calib, seed=ctx.seed)
            try:
                run_chain(state)
            finally:
                if state.emitter is not None:
                    state.emitter.cache.unlink(missing_ok=True)  # the calibration cache serves this stage run only
        outcome, emitter = state.outcome, state.emitter
        assert state.prep is not None and outcome is not None
        final = ctx.path("model_int8.onnx")
        with atomic_path(final) as tmp:
            shutil.copyfile(outcome.path, tmp)
        fb = cfg.fallback
        metrics["fallback"] = {"target": fb.model_dump(), "met": outcome.met, "steps": outcome.steps,
                               "chosen_step": outcome.chosen_step,
                               "float_layers": outcome.float_layers, "excluded_nodes": outcome.excluded_nodes}
        metrics["layer_errors"] = [t.to_dict() for t in tensor_errors(state.prep, final, state.debug_reader)[:10]]
        if emitter.range_search is not None:
            metrics["range_search"] = emitter.range_search
        if emitter.gptq is not None:
            metrics["gptq"] = emitter.gptq
        metrics["target"] = _report_target(ctx, _target_plan(cfg), saturation.check(final, state.ranges),
                                           emitter.seven_bit, emitter.widened.get(outcome.path, {}))
        if not outcome.met:
            ctx.console.print(f"[yellow]quantize: fallback target not met after {len(outcome.steps) - 1} steps; "
                              f"keeping step {outcome.chosen_step} ({len(outcome.float_layers)} layers in float)[/]")
        return Artifact(final, "onnx", "int8", f"static QDQ INT8 ({'QAT, ' if cfg.method == 'qat' else ''}{cfg.calibration}, "
                        f"{'per-channel' if cfg.per_channel else 'per-tensor'}), {len(outcome.excluded_nodes)} nodes float")

    # -- measurements ------------------------------------------------------------------------
    def _measure(self, ctx: StageContext, cfg: QuantizeConfig, fp32_path: Path, made: dict[str, Artifact],
                 metrics: dict[str, Any]) -> None:
        from pipeline.backends import onnxruntime as ort_backend
        from pipeline.quantization.evaluate import backend_latencies, score
        from pipeline.quiet import quiet_machine

        split = ctx.data.eval or ctx.data.calibration
        x1 = np.ascontiguousarray(ctx.example_input[:1].detach().cpu().numpy(), dtype=np.float32)
        entries: dict[str, Any] = {}
        with ort_backend.load(fp32_path, threads=ctx.threads) as reference:
            for name, art in {"fp32": Artifact(fp32_path, "onnx", "fp32"), **made}.items():
                entry: dict[str, Any] = {"path": str(art.path), "size_bytes": Path(art.path).stat().st_size}
                if split is not None:
                    with ort_backend.load(art.path, threads=ctx.threads) as sess:
                        s = score(sess, reference, split, cfg.eval_samples)
                    entry.update(accuracy=s["accuracy"], agreement=s["agreement"], max_abs_err=s["max_abs_err"],
                                 sqnr_db=s["sqnr_db"], eval_samples=s["samples"])
                with quiet_machine():  # in a parallel sweep: the other trials wait while this one times
                    entry["latency_ms"], entry["backends"] = backend_latencies(
                        art.path, art.precision or "fp32", x1, list(cfg.backends), ctx.threads, cfg.latency_iterations)
                entries[name] = entry
        metrics["fp32"] = entries.pop("fp32")
        metrics["artifacts"] = entries
        for name, e in entries.items():
            lat = ", ".join(f"{b} {v:.2f} ms" for b, v in e["latency_ms"].items() if v is not None)
            agree = e.get("agreement")
            ctx.console.print(f"{name}: agreement {agree:.3f}, {lat}" if agree is not None else f"{name}: {lat}")


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

