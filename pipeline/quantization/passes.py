"""Static INT8 as a chain of passes, registered by decorator: one algorithm, one module.

A pass is a class with a `name`, an `order` (its place in the chain), a typed `Config` built from
the quantize stage's recipe keys by `configure` (None = the pass does not run), and one entry point
`run(state, config)` that reads and updates the shared `QuantState`. Passes may work on the ONNX
file (`state.prep`, the float model the emission quantizes) or on the torch model (`state.model`,
QAT). Each lives next to its algorithm in `pipeline/quantization/` and registers itself with
`@register`; `chain` imports the package's modules, so adding an algorithm is one new file
(docs/architecture.md shows an example).

The chain, by order: preprocess (10, ort_quant), equalization (20), bias_correction (30),
keep_float (40, debug), range_setting (50, calibration), qat (60), emission (70), fallback (80).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

ConfigT = TypeVar("ConfigT")


@dataclass
class QuantState:
    """Everything the passes share. Inputs are set by the quantize stage; passes fill the rest."""

    cfg: Any  # the quantize stage's config (recipe keys); each pass reads its own part via configure
    fp32: Path  # the FP32 ONNX file, as exported
    work: Path  # the stage's work directory
    reader: Any  # StreamingReader over data.calibration
    debug_reader: Any  # a few calibration samples for per-tensor error analysis
    evaluate: Callable[[Path], dict[str, Any]]  # scores an INT8 file on the deployable session
    console: Any
    model: Any = None  # the torch model fp32 was exported from (None for ONNX sources)
    train: Any = None  # images for gradient-based passes (data.train, else data.calibration)
    seed: int = 0
    prep: Path | None = None  # the float ONNX file the emission quantizes
    exclude: list[str] = field(default_factory=list)  # nodes kept float from the start
    ranges: dict[str, Any] = field(default_factory=dict)  # per-channel activation ranges
    calibrated: Path | None = None  # nearest-rounded QDQ file with the calibrated ranges (QAT's placement)
    emitter: Any = None  # emission.Emitter: `emitter(exclude, tag) -> Path`, owns the calibration cache
    first: Path | None = None  # step 0 of the fallback
    first_scores: dict[str, Any] | None = None
    outcome: Any = None  # fallback.FallbackOutcome
    metrics: dict[str, Any] = field(default_factory=dict)


class QuantPass(Generic[ConfigT]):
    """One algorithm. `configure` maps the stage config to this pass's typed config (None: skip)."""

    name: ClassVar[str]
    order: ClassVar[int]

    def configure(self, stage_cfg: Any) -> ConfigT | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, state: QuantState, config: ConfigT) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


PASSES: dict[str, type[QuantPass[Any]]] = {}


def register(cls: type[QuantPass[Any]]) -> type[QuantPass[Any]]:
    """Class decorator: add a pass to the chain (names are unique)."""
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise ValueError(f"quantization pass '{cls.name}' is registered twice")
    PASSES[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every module of pipeline.quantization, so each one's `@register` has run."""
    import pipeline.quantization as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def chain(stage_cfg: Any) -> list[tuple[QuantPass[Any], Any]]:
    """The passes that run for this stage config, in order, each with its own config."""
    _discover()
    out = []
    for cls in sorted(PASSES.values(), key=lambda c: (c.order, c.name)):
        p = cls()
        cfg = p.configure(stage_cfg)
        if cfg is not None:
            out.append((p, cfg))
    return out


def run_chain(state: QuantState) -> QuantState:
    """Run every enabled pass on `state`; the names that ran are recorded in the metrics."""
    ran = []
    for p, cfg in chain(state.cfg):
        p.run(state, cfg)
        ran.append(p.name)
    state.metrics["passes"] = ran
    return state
