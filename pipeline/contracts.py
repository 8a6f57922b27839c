"""The contracts every layer shares: artifacts, stage configs, stage results and gate results.

This module imports nothing of fmap, so domain packages (quantization, verify, export, ...) can
speak the same types as the stages and the runner without importing the orchestration layer
(tests/test_architecture.py checks it). Stages exchange work through `Artifact`s; a stage's
`run` returns a `StageResult`; gates evaluate to `GateResult`s that the CLI turns into exit codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

ArtifactKind = Literal["torch", "onnx", "tensorrt", "openvino", "stats", "plot", "report", "log", "other"]


class StageConfig(BaseModel):
    """Base for every stage's config: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no `lr: .inf`


def run_relative(path: str | Path, run_dir: Path) -> str:
    """`path` relative to the run directory (how manifests and reports name files), else as given."""
    try:
        return str(Path(path).resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


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
        path = str(self.path) if run_dir is None else run_relative(self.path, run_dir)
        return {"path": path, "kind": self.kind, "precision": self.precision, "description": self.description}


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
