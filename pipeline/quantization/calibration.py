"""A CalibrationDataReader that streams batches from a DataSplit instead of materialising them.

ORT's calibrators pull one feed dict at a time; handing them a generator keeps calibration memory
at one batch no matter how many samples the recipe asks for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import BadInput
from pipeline.sources.data import DataSplit
from pipeline.quantization.passes import QuantPass, QuantState, register

try:  # the base class only adds an iterator protocol; fall back to object without onnxruntime
    from onnxruntime.quantization import CalibrationDataReader as _Base
except ImportError:  # pragma: no cover - onnxruntime is a hard dependency
    _Base = object  # type: ignore[misc,assignment]


class StreamingReader(_Base):  # type: ignore[misc,valid-type]
    """Yield {input_name: batch} for at most `samples` samples of `split`; `rewind()` restarts.

    Non-finite or missing samples are BadInput naming `data.<split_key>`: the calibrators would
    otherwise fail deep inside onnxruntime ("scale issue") or quantize with NaN ranges.
    """

    def __init__(self, split: DataSplit, input_name: str, samples: int | None = None,
                 batch_size: int | None = None, split_key: str = "calibration", uniform: bool = False) -> None:
        self.split = split
        self.input_name = input_name
        self.samples = samples
        self.batch_size = batch_size or split.batch_size
        self.served = 0
        self.split_key = split_key
        self.uniform = uniform
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _plan(self) -> tuple[int, float]:
        """(batch size, samples to serve). `uniform` readers serve equal batches only: onnxruntime's
        histogram calibrators (entropy, percentile) stack every batch of a tensor into one array
        and fail on a short last batch. The largest divisor of the sample count up to the batch
        size keeps every sample; below 8 the remainder is dropped instead (fewer, larger batches)."""
        left = self.samples if self.samples is not None else float("inf")
        if not self.uniform:
            return self.batch_size, left
        n = self.samples_available()
        size = next(b for b in range(min(self.batch_size, max(n, 1)), 0, -1) if n % b == 0)
        if size < min(8, self.batch_size) and n >= self.batch_size:
            size = self.batch_size
        return size, n - n % size

    def _gen(self) -> Iterator[dict[str, np.ndarray]]:
        size, left = self._plan()
        start = 0
        for x, _ in self.split.batches(size):
            if left <= 0:
                return
            x = x[: int(min(left, x.shape[0]))]
            arr = np.ascontiguousarray(x.numpy(), dtype=np.float32)
            if not np.isfinite(arr).all():  # one NaN poisons every range the calibrator computes
                bad = int(np.argwhere(~np.isfinite(arr.reshape(len(arr), -1)).all(1)).reshape(-1)[0]) + start
                raise BadInput(f"data.{self.split_key}: sample {bad} has NaN or Inf values; "
                               "calibration needs finite inputs")
            left -= int(x.shape[0])
            start += int(x.shape[0])
            self.served += int(x.shape[0])
            yield {self.input_name: arr}
        if start == 0:
            raise BadInput(f"data.{self.split_key}: the split yields no samples; calibration needs at least one")

    def samples_available(self) -> int:
        """How many samples a full pass serves: the recipe's count, capped by the split's size."""
        n = len(self.split)
        return n if self.samples is None else min(self.samples, n) if n else self.samples

    def get_next(self) -> dict[str, Any] | None:
        if self._it is None:
            self._it = self._gen()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None
        self.served = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._gen()


# -- the pass ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RangeSettingConfig:
    calibration: str  # minmax | entropy | percentile | mse (range search over min-max, range_search.py)


@register
class RangeSetting(QuantPass[RangeSettingConfig]):
    """Pass 50: per-channel activation ranges (for the saturation check and the overflow fix) and the
    per-tensor calibration every later emission reuses; leaves `state.emitter` ready."""

    name = "range_setting"
    order = 50

    def configure(self, stage_cfg: Any) -> RangeSettingConfig:
        return RangeSettingConfig(stage_cfg.calibration)

    def run(self, state: QuantState, config: RangeSettingConfig) -> None:
        from pipeline.quantization import saturation
        from pipeline.quantization.emission import Emission, Emitter

        assert state.prep is not None
        with state.console.status(f"activation ranges per channel ({state.reader.samples_available()} samples)"):
            state.ranges = saturation.activation_ranges(state.prep, state.reader)
        state.emitter = Emitter(Emission().configure(state.cfg), state.prep, state.work, state.reader,
                                state.ranges, state.console)
        state.calibrated = state.emitter.calibrate(state.exclude)
