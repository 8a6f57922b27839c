"""One small interface for every inference backend (after Polygraphy: load separately from run).

A backend module exposes `available() -> str | None` (None when usable, else the reason it is
not), and `load(artifact, threads, **options) -> Session`. A `Session` runs numpy batches and
describes itself. Heavy imports (onnxruntime, openvino, tensorrt) happen inside `load`, so that
`import pipeline` never needs them.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Session(Protocol):
    backend: str

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run one batch (NCHW float32) and return the first output as a numpy array."""

    def describe(self) -> dict[str, Any]:
        """Backend name, version, providers/device, threads, execution precision actually used."""

    def close(self) -> None:
        """Release the session."""


class BackendUnavailable(RuntimeError):
    """Raised by load() when a backend cannot run here; verify reports it as a visible skip."""
