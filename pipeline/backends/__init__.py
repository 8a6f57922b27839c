"""Backend registry: name -> module `pipeline.backends.<name>`, imported only when asked for.

A backend whose module or library is missing is not an error here: `available(name)` returns the
reason as a string, so verify can show it as a visible skip instead of crashing or hiding it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "openvino", "tensorrt")

# Which artifact kinds each backend can load (verify uses this to pair artifacts with backends).
LOADS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "onnxruntime": ("onnx",),
    "openvino": ("onnx", "openvino"),
    "tensorrt": ("tensorrt",),
}


def get_backend(name: str) -> ModuleType:
    """Import and return the backend module (KeyError for an unknown name, ImportError if absent)."""
    if name not in BACKENDS:
        raise KeyError(f"unknown backend '{name}' (known: {', '.join(BACKENDS)})")
    return importlib.import_module(f"pipeline.backends.{name}")


def available(name: str) -> str | None:
    """None when `name` can run here, else a one-line reason why not."""
    try:
        module = get_backend(name)
    except KeyError as exc:
        return str(exc.args[0])
    except ImportError as exc:
        return f"backend module pipeline.backends.{name} cannot be imported: {exc}"
    try:
        return module.available()
    except Exception as exc:  # a probe must never crash verify
        return f"{name} availability check failed: {type(exc).__name__}: {exc}"
