"""Pass 70: QDQ emission, and the `Emitter` the fallback re-runs with more layers kept float.

The emitter calibrates once (a cache file that later calls reuse, so every step of the fallback
sees the same ranges), rounds weights (nearest, or GPTQ), and on targets whose kernels saturate
int16 pairs widens the weight scales of exactly the channels at risk (overflow_fix), so the file
computes the same on every x86 CPU. Should widening not converge, those layers get 7-bit weights,
which are safe by construction.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.quantization.passes import QuantPass, QuantState, register


@dataclass(frozen=True)
class EmissionConfig:
    calibration: str  # minmax | entropy | percentile | mse
    per_channel: bool
    activation_type: str  # quint8 | qint8
    weight_rounding: str  # nearest | gptq
    rounding_reference: str  # what GPTQ compensates toward: "nearest" after bias correction, else "float"
    overflow_fix: bool  # the target's kernels saturate int16 pairs (x86 without VNNI)


class Emitter:
    """`emitter(exclude, tag) -> Path`: one QDQ file with `exclude` kept float."""

    def __init__(self, config: EmissionConfig, prep: Path, work: Path, reader: Any, ranges: dict[str, Any],
                 console: Any) -> None:
        self.config, self.prep, self.work, self.reader, self.ranges, self.console = (
            config, prep, work, reader, ranges, console)
        self.cache = work / f".calibration.{os.getpid()}.json"
        self.cache.unlink(missing_ok=True)
        self.seven_bit: dict[str, int] = {}  # float weight name -> channel axis
        self.widened: dict[Path, dict[str, Any]] = {}  # file -> {layer: channels widened}
        self.range_search: dict[str, Any] | None = None  # calibration: mse, what the search changed
        self.gptq: dict[str, Any] | None = None  # weight_rounding: gptq, output MSE per layer
        self._rounding_cache: dict[str, Any] = {}

    def calibrate(self, exclude: list[str]) -> Path:
        """Write the calibration cache (and, for mse, search the ranges); returns a nearest-rounded
        QDQ file with those ranges, without overflow fix: the placement and scales QAT simulates."""
        path = self.work / "int8_calibrated.onnx"
        self._quantize(exclude, path)
        return path

    def __call__(self, exclude: list[str], tag: str) -> Path:
        from pipeline.quantization.overflow_fix import widen_scales

        path = self.work / f"int8_step{tag}.onnx"
        self._quantize(exclude, path)
        if self.config.weight_rounding == "gptq":
            from pipeline.quantization import gptq

            with self.console.status("error-compensating weight rounding (GPTQ)"):
                self.gptq = gptq.apply(path, self.prep, self.reader, self._rounding_cache,
                                       reference=self.config.rounding_reference)
        if self.config.overflow_fix:
            self.widened[path], risky = widen_scales(path, self.prep, self.ranges)
            if risky:  # widening did not converge: 7-bit weights are safe by construction
                self.seven_bit.update({r.weight: r.weight_axis for r in risky})
                self._quantize(exclude, path)
        return path

    def _quantize(self, exclude: list[str], path: Path) -> None:
        from pipeline.quantization import ort_quant

        c = self.config
        first = not self.cache.exists()
        status = (self.console.status(f"calibrating ({c.calibration}, {self.reader.samples_available()} samples)")
                  if first else nullcontext())
        with status:
            self.reader.rewind()
            ort_quant.quantize_static_qdq(
                self.prep, path, self.reader, calibration="minmax" if c.calibration == "mse" else c.calibration,
                per_channel=c.per_channel, exclude=exclude, activation_type=c.activation_type,
                seven_bit_weights=dict(self.seven_bit), calibration_cache=self.cache)
            if first and c.calibration == "mse":  # min-max wrote the cache: search ranges, then re-quantize
                from pipeline.quantization.range_search import refine_cache

                self.range_search = refine_cache(self.cache, self.prep, self.reader)
                self._quantize(exclude, path)


@register
class Emission(QuantPass[EmissionConfig]):
    """Step 0: the first INT8 file, scored on the deployable session."""

    name = "emission"
    order = 70

    def configure(self, stage_cfg: Any) -> EmissionConfig:
        from pipeline.quantization import targets

        return EmissionConfig(
            calibration=stage_cfg.calibration, per_channel=stage_cfg.per_channel,
            activation_type=stage_cfg.activation_type, weight_rounding=stage_cfg.weight_rounding,
            rounding_reference="nearest" if stage_cfg.bias_correction else "float",
            overflow_fix=targets.needs_overflow_fix(targets.resolve(stage_cfg.target)))

    def run(self, state: QuantState, config: EmissionConfig) -> None:
        if state.first is not None:  # an earlier pass (QAT) already emitted and scored step 0
            return
        state.first = state.emitter(state.exclude, "0")
        state.first_scores = state.evaluate(state.first)
