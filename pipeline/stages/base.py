"""The contract between the runner and every stage.

A stage is a small object with a pydantic `Config` (extra keys forbidden) and `run(ctx, cfg)`,
returning a `StageResult`. The runner knows nothing else about it. Stages exchange work through
`ctx.model` (the current torch model: prune replaces it) and `ctx.artifacts` (named files such as
"onnx_fp32" or "onnx_int8" that later stages and verify pick up). The shared result types live
in `pipeline.contracts` and are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pipeline.contracts import Artifact, ArtifactKind, GateResult, StageConfig, StageResult

__all__ = ["Artifact", "ArtifactKind", "GateResult", "Stage", "StageConfig", "StageContext", "StageResult"]

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from rich.console import Console

    from pipeline.recipe_models import ModelConfig
    from pipeline.sources.data import DataBundle


@dataclass
class StageContext:
    """Everything a stage may use. Built by the runner; stages mutate only `model` and `artifacts`."""

    run_dir: Path
    model: torch.nn.Module  # the current model; prune replaces it
    original_model: torch.nn.Module  # the FP32 model as loaded, never mutated: the reference
    example_input: torch.Tensor  # a batch of the recipe's input_shape
    data: DataBundle
    console: Console
    # the recipe's model config: how a fresh process rebuilds the model (prune records it in its
    # checkpoint, isolated timing rebuilds the original); None for a model given as an object
    model_spec: ModelConfig | None = None
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


ConfigT = TypeVar("ConfigT", bound=StageConfig)


class Stage(Generic[ConfigT]):
    """Base class for stages: `class QuantizeStage(Stage[QuantizeConfig])` sets `name`, `Config`
    and implements `run(ctx, cfg: QuantizeConfig)`, typed once, with no casts or ignores."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    description: ClassVar[str] = ""

    def run(self, ctx: StageContext, cfg: ConfigT) -> StageResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def requires(self, cfg: ConfigT) -> tuple[str, ...]:
        """Artifacts an earlier stage must produce: `fmap validate` checks the order from these, so a
        recipe never reaches a stage that would have to make its own inputs."""
        return ()

    def produces(self, cfg: ConfigT) -> tuple[str, ...]:
        """Artifacts `run` returns in its StageResult. The runner, and only the runner, records them
        in the run (manifest and `ctx.artifacts`), and fails a stage that does not deliver them."""
        return ()

    def check_model(self, cfg: ConfigT, model: Any) -> None:
        """BadInput when `cfg` names something `model` does not have (a layer, an output).

        Called on the built model before the first stage runs (and by `fmap validate --build`), so
        a misspelt layer name fails in seconds instead of after the stages before this one.
        """

    def restore(self, ctx: StageContext, cfg: ConfigT, result: StageResult) -> None:
        """Called instead of `run` when --resume skips this stage: rebuild what `run` left in ctx.

        The default does nothing; a stage that replaces `ctx.model` (prune) reloads its checkpoint
        here so that later stages see the same model as in the original run.
        """
