"""The tensorrt stage: build engines from the run's ONNX artifacts (pipeline.export.tensorrt does the
work on plain paths; this module adapts it to a run: artifacts so far, run directory, console)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from pipeline.export.tensorrt import TensorRTConfig, build_engine_set
from pipeline.stages.base import Artifact, Stage, StageConfig, StageContext, StageResult


def build_engines(ctx: StageContext, cfg: TensorRTConfig, sources: Mapping[str, Artifact] | None = None) -> StageResult:
    """Engines from the run's artifacts plus `sources` (the export stage's ONNX, written this stage),
    into <run_dir>/tensorrt."""
    artifacts = {**ctx.artifacts, **(sources or {})}
    return build_engine_set(cfg, artifacts, ctx.run_dir / "tensorrt", tuple(ctx.example_input.shape), ctx.console)


class TensorRTStage(Stage[TensorRTConfig]):
    """Standalone engine build, for recipes that quantize after exporting ONNX."""

    name: ClassVar[str] = "tensorrt"
    Config: ClassVar[type[StageConfig]] = TensorRTConfig
    description: ClassVar[str] = "build TensorRT engines (fp16 from onnx_fp32, int8 from the QDQ onnx_int8)"

    def requires(self, cfg: TensorRTConfig) -> tuple[str, ...]:
        """fp16 engines build from the FP32 file, int8 engines from the QDQ file; best builds both."""
        return {"fp16": ("onnx_fp32",), "int8": ("onnx_int8",)}.get(cfg.precision, ("onnx_fp32", "onnx_int8"))

    def run(self, ctx: StageContext, cfg: TensorRTConfig) -> StageResult:
        return build_engines(ctx, cfg)
