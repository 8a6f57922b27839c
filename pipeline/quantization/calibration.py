"""A CalibrationDataReader that streams batches from a DataSplit instead of materialising them.

ORT's calibrators pull one feed dict at a time; handing them a generator keeps calibration memory
at one batch no matter how many samples the recipe asks for.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.errors import BadInput
from pipeline.sources.data import DataSplit

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
                 batch_size: int | None = None, split_key: str = "calibration") -> None:
        self.split = split
        self.input_name = input_name
        self.samples = samples
        self.batch_size = batch_size or split.batch_size
        self.served = 0
        self.split_key = split_key
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _gen(self) -> Iterator[dict[str, np.ndarray]]:
        left = self.samples if self.samples is not None else float("inf")
        start = 0
        for x, _ in self.split.batches(self.batch_size):
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
