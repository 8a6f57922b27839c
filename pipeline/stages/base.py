"""The contract between the runner and every stage.

A stage is a small object with a pydantic `Config` (extra keys forbidden) and `run(ctx, cfg)`,
returning a `StageResult`. The runner knows nothing else about it. Stages exchange work through
`ctx.model` (the current torch model: prune replaces it) and `ctx.artifacts` (named files such as
"onnx_fp32" or "onnx_int8" that later stages and verify pick up).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from rich.console import Console

    from pipeline.recipe import Recipe
    from pipeline.sources.data import DataBundle

ArtifactKind = Literal["torch", "onnx", "tensorrt", "openvino", "stats", "plot", "report", "log", "other"]


class StageConfig(BaseModel):
    """Base for every stage's config: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no `lr: .inf`


@dataclass(frozen=True)
class Artifact:
    """A file a stage produced. `kind` + `precision` let verify decide how to run it."""

    path: Path
    kind: ArtifactKind
    precision: str | None = None  # "fp32", "fp16", "int8" for model artifacts
    description: str = ""

    @property
    def is_model(self) -> bool:
        return self.kind in ("torch", "onnx", "tensorrt", "openvino")

    def to_dict(self, run_dir: Path | None = None) -> dict[str, Any]:
        path = self.path
        if run_dir is not None:
            try:
                path = self.path.resolve().relative_to(run_dir.resolve())
            except ValueError:
                pass
        return {"path": str(path), "kind": self.kind, "precision": self.precision, "description": self.description}


@dataclass(frozen=True)
class GateResult:
    """One CI gate, evaluated: the run exits 1 if any gate has passed=False."""

    name: str
    threshold: float
    value: float | None
    passed: bool
    artifact: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "threshold": self.threshold,
            "value": self.value,
            "passed": self.passed,
            "artifact": self.artifact,
            "detail": self.detail,
        }


@dataclass
class StageResult:
    """What a stage hands back: JSON-serialisable metrics, named artifacts, optional gates."""

    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    status: Literal["ok", "skipped"] = "ok"
    skip_reason: str | None = None

    @classmethod
    def skipped(cls, reason: str, **metrics: Any) -> StageResult:
        return cls(metrics=dict(metrics), status="skipped", skip_reason=reason)


@dataclass
class StageContext:
    """Everything a stage may use. Built by the runner; stages mutate only `model` and `artifacts`."""

    recipe: Recipe
    run_dir: Path
    model: torch.nn.Module  # the current model; prune replaces it
    original_model: torch.nn.Module  # the FP32 model as loaded, never mutated: the reference
    example_input: torch.Tensor  # a batch of the recipe's input_shape
    data: DataBundle
    console: Console
    threads: int = 2
    seed: int = 0
    results: dict[str, StageResult] = field(default_factory=dict)  # by stage id, in run order
    artifacts: dict[str, Artifact] = field(default_factory=dict)  # by artifact name, all stages

    def path(self, filename: str) -> Path:
        """Where a stage should write `filename` (inside the run directory)."""
        p = self.run_dir / filename
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def model_artifacts(self) -> dict[str, Artifact]:
        return {name: a for name, a in self.artifacts.items() if a.is_model}


class Stage:
    """Base class for stages. Subclasses set `name`, `Config` and implement `run`."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    description: ClassVar[str] = ""

    def run(self, ctx: StageContext, cfg: StageConfig) -> StageResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def restore(self, ctx: StageContext, cfg: StageConfig, result: StageResult) -> None:
        """Called instead of `run` when --resume skips this stage: rebuild what `run` left in ctx.

        The default does nothing; a stage that replaces `ctx.model` (prune) reloads its checkpoint
        here so that later stages see the same model as in the original run.
        """
