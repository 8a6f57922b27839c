"""One small interface for every inference backend (after Polygraphy: load separately from run).

A backend module registers itself with `@backend(name, loads=..., available=...)` on its
`load(artifact, threads, precision_hint=None, **options) -> Session` function; `available()`
returns None when usable, else the reason it is not. A `Session` runs numpy batches, describes
itself and is a context manager (`with backend.load(...) as session:`) that releases what it
holds on exit. Sessions keep their settings (threads) to themselves: none changes process-wide
state. Heavy imports (onnxruntime, openvino, tensorrt) happen inside `load`, so that
`import pipeline` never needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from pipeline.registry import Registry


class Session(Protocol):
    backend: str

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run one batch (NCHW float32) and return the first output as a numpy array."""

    def describe(self) -> dict[str, Any]:
        """Backend name, version, providers/device, threads, execution precision actually used."""

    def close(self) -> None:
        """Release the session."""

    def __enter__(self) -> Session: ...

    def __exit__(self, *exc: Any) -> None: ...


class SessionBase:
    """`with` support for sessions: exiting closes, also when the body raised."""

    def close(self) -> None:  # pragma: no cover - every session overrides it
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class BackendUnavailable(RuntimeError):
    """Raised by load() when a backend cannot run here; verify reports it as a visible skip."""


@dataclass(frozen=True)
class Backend:
    """A registered backend: what it loads, how to probe it, how to load an artifact."""

    name: str
    loads: tuple[str, ...]  # artifact kinds (contracts.ArtifactKind) it can run
    load: Callable[..., Session]
    available: Callable[[], str | None]
    libraries: tuple[str, ...] = ()  # distributions whose versions a run's environment records


# Built-ins: every module of pipeline.backends but this one; plug-ins register from their own files.
BACKENDS: Registry[Backend] = Registry("backend", "pipeline.backends", include=lambda m: m != "base",
                                       order=("torch", "onnxruntime", "openvino", "tensorrt"))


def backend(name: str, *, loads: tuple[str, ...], available: Callable[[], str | None],
            libraries: tuple[str, ...] = ()) -> Callable[[Callable[..., Session]], Callable[..., Session]]:
    """Register the decorated `load` function as backend `name`."""

    def wrap(load: Callable[..., Session]) -> Callable[..., Session]:
        BACKENDS.add(name, Backend(name, tuple(loads), load, available, tuple(libraries)))
        return load

    return wrap
