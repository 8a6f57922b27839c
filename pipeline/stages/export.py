"""Export stage: ctx.model -> checked ONNX FP32 ("onnx_fp32"), proven equivalent, optionally TensorRT.

Equivalence is checked on real calibration inputs where the recipe has them (random inputs hide
problems in saturating layers), else on ctx.example_input. Above tolerance the stage fails (exit 3).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from pipeline.errors import StageFailed
from pipeline.export.onnx import DEFAULT_OPSET
from pipeline.export.tensorrt import TensorRTConfig
from pipeline.stages.base import Artifact, Stage, StageConfig, StageContext, StageResult

if TYPE_CHECKING:
    import torch

FP32_NAME = "onnx_fp32"
FP32_FILE = "model_fp32.onnx"


class OnnxOptions(StageConfig):
    opset: int = Field(DEFAULT_OPSET, ge=11, le=23)
    dynamic_batch: bool = True
    simplify: bool = True  # onnxslim (pure-python wheel); see docs/stages/export.md
    constant_folding: bool = True


class EquivalenceOptions(StageConfig):
    atol: float = Field(1e-4, ge=0)
    rtol: float = Field(1e-3, ge=0)
    samples: int = Field(64, gt=0)  # calibration samples compared (torch vs ORT FP32)


class ExportConfig(StageConfig):
    onnx: OnnxOptions = OnnxOptions()
    equivalence: EquivalenceOptions = EquivalenceOptions()
    tensorrt: TensorRTConfig | None = None  # built after the ONNX export (pipeline/export/tensorrt.py)


def check_inputs(ctx: StageContext, samples: int) -> Iterator[torch.Tensor]:
    """Calibration batches when the recipe has them, else the example input (an empty calibration
    split is quantize's error to report, not a reason for export to fail)."""
    split = ctx.data.calibration if ctx.data is not None else None
    if split is None or len(split) == 0:
        yield ctx.example_input
        return
    seen = 0
    for x, _ in split.batches():
        if seen >= samples:
            return
        yield x
        seen += int(x.shape[0])


def export_fp32(ctx: StageContext, cfg: ExportConfig) -> tuple[Artifact, dict]:
    """Export + check; shared with the quantize stage when no "onnx_fp32" exists yet."""
    from pipeline.export.onnx import check_equivalence, export_onnx

    path = ctx.path(FP32_FILE)
    o = cfg.onnx
    user_onnx = getattr(ctx.model, "onnx_path", None)
    if user_onnx is not None:  # an onnx: model is already ONNX: adopt a prepared copy, checked below
        from pipeline.export.adopt import adopt_onnx

        _, dynamic = adopt_onnx(user_onnx, path)
        ctx.console.print(f"onnx fp32: adopted {user_onnx} ({'dynamic' if dynamic else 'static'} batch)")
    else:
        with ctx.console.status(f"exporting ONNX (opset {o.opset})"):
            export_onnx(ctx.model, ctx.example_input, path, opset=o.opset, dynamic_batch=o.dynamic_batch,
                        simplify=o.simplify, constant_folding=o.constant_folding)
    e = cfg.equivalence
    eq = check_equivalence(path, ctx.model, check_inputs(ctx, e.samples), atol=e.atol, rtol=e.rtol,
                           threads=ctx.threads, max_samples=e.samples)
    metrics = {"path": str(path), "size_bytes": path.stat().st_size, "opset": _opset(path),
               "source": "adopted" if user_onnx is not None else "exported",
               "dynamic_batch": o.dynamic_batch, "simplified": o.simplify, "equivalence": eq.to_dict()}
    if not eq.passed:
        raise StageFailed(
            f"ONNX export differs from torch: {eq.mismatched}/{eq.elements} elements exceed atol={e.atol} "
            f"and rtol={e.rtol} (max abs {eq.max_abs_diff:.3g}, max rel {eq.max_rel_diff:.3g}, NaN {eq.nan})")
    ctx.console.print(f"onnx fp32: {path.name}, max abs diff {eq.max_abs_diff:.2e} on {eq.samples} samples")
    art = Artifact(path, "onnx", "fp32", f"ONNX opset {o.opset}, checked against torch")
    return art, metrics


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


class ExportStage(Stage[ExportConfig]):
    name = "export"
    Config: ClassVar[type[StageConfig]] = ExportConfig
    description = "Export the current model to ONNX, check it against torch, optionally build TensorRT engines"

    def produces(self, cfg: ExportConfig) -> tuple[str, ...]:
        return (FP32_NAME,)

    def run(self, ctx: StageContext, cfg: ExportConfig) -> StageResult:
        art, metrics = export_fp32(ctx, cfg)
        result = StageResult(metrics={"onnx": metrics}, artifacts={FP32_NAME: art})
        if cfg.tensorrt is not None:
            from pipeline.export.tensorrt import build_engine_set

            trt = build_engine_set(cfg.tensorrt, {**ctx.artifacts, FP32_NAME: art}, ctx.run_dir / "tensorrt",
                                   tuple(ctx.example_input.shape), ctx.console)
            result.metrics.update(trt.metrics)
            result.artifacts.update(trt.artifacts)
        return result
