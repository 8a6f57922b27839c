"""The registry of model sources: `prefix:rest` strings in a recipe's `model.source` -> nn.Module.

Each source lives in its own `from_<prefix>.py` module and registers itself with `@model_source`;
adding a source is adding one file (in this package, or a plug-in file: pipeline.plugins). Modules import their heavy libraries (torch, onnx, timm) inside
the functions, so the registry loads fast enough for `fmap validate` and schema checks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import BadInput
from pipeline.registry import Registry

# Shown in error messages in this order; sources not listed here follow alphabetically.
_ORDER = ("torchvision", "builtin", "python", "timm", "onnx", "torchscript", "exported")


@dataclass(frozen=True)
class BuildContext:
    """What a source may need besides its spec: where the recipe lives and a logger."""

    base_dir: Path | None = None  # the recipe's directory: relative paths and modules resolve there too
    log: Callable[[str], None] | None = None
    has_weights: bool = False  # model.weights is set: the source need not load or train its own

    def resolve(self, path: str) -> Path:
        """A user path: as given (absolute or from the working directory), else from the recipe's directory."""
        p = Path(path).expanduser()
        if p.exists() or p.is_absolute() or self.base_dir is None:
            return p
        beside = self.base_dir / p
        return beside if beside.exists() else p

    def importable(self) -> None:
        """Put the recipe's directory and the working directory on sys.path (as `python -m` would)."""
        for d in [self.base_dir, Path.cwd()]:
            if d is not None and str(d.resolve()) not in sys.path:
                sys.path.insert(0, str(d.resolve()))


@dataclass(frozen=True)
class ModelSource:
    prefix: str
    syntax: str  # shown in errors and docs, e.g. "onnx:PATH"
    build: Callable[[str, dict[str, Any], BuildContext], Any]
    check: Callable[[str], str | None] | None = None  # cheap syntax check of `rest`: an error or None
    input_shape: Callable[[str, dict[str, Any], BuildContext], list[int] | None] | None = None
    # False for graphs without torch submodules (TorchScript, torch.export, ONNX): forward hooks,
    # torch.fx and torch-pruning cannot see their layers, so profile works from an ONNX view and
    # prune/visualize refuse with a reason.
    editable: bool = True
    kind: str = "torch module"


SOURCES: Registry[ModelSource] = Registry("model source", "pipeline.sources",
                                          include=lambda m: m.startswith("from_"), order=_ORDER)


def model_source(prefix: str, syntax: str, *, check: Callable[[str], str | None] | None = None,
                 input_shape: Callable[..., list[int] | None] | None = None, editable: bool = True,
                 kind: str = "torch module") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated `build(rest, kwargs, ctx) -> nn.Module` under `prefix`."""

    def wrap(build: Callable[..., Any]) -> Callable[..., Any]:
        SOURCES.add(prefix, ModelSource(prefix, syntax, build, check, input_shape, editable, kind))
        return build

    return wrap


def all_sources() -> list[ModelSource]:
    return [source for _, source in SOURCES.items()]


def expected_syntax() -> str:
    syntaxes = [s.syntax for s in all_sources()]
    return "expected " + ", ".join(repr(s) for s in syntaxes[:-1]) + f" or {syntaxes[-1]!r}"


def check_spec(spec: str) -> str | None:
    """A one-line problem with `spec` (no imports of heavy libraries), or None when it is well formed."""
    prefix, sep, rest = spec.partition(":")
    if not sep or prefix not in SOURCES or not rest:
        return expected_syntax()
    source = SOURCES.get(prefix)
    return source.check(rest) if source.check is not None else None


def get_source(spec: str) -> tuple[ModelSource, str]:
    """The source registered for `spec`'s prefix and the rest of the spec."""
    problem = check_spec(spec)
    if problem:
        raise BadInput(f"model '{spec}': {problem}")
    prefix, _, rest = spec.partition(":")
    return SOURCES.get(prefix), rest


def is_editable(model: Any) -> bool:
    """False for a graph fmap cannot hook or prune (set by the non-editable sources on the module).
    A TorchScript module counts as one by its type too: `copy.deepcopy` (the runner's original
    model) drops Python attributes set on a ScriptModule."""
    if getattr(model, "fmap_graph_only", False):
        return False
    torch = sys.modules.get("torch")
    return not (torch is not None and isinstance(model, torch.jit.ScriptModule))


# A bare path is read as the source its extension names: `fmap profile tiny.onnx`.
SUFFIX_PREFIX = {".onnx": "onnx", ".pt2": "exported", ".ts": "torchscript", ".torchscript": "torchscript"}


def spec_from_path(spec: str) -> str:
    """`model.onnx` -> `onnx:model.onnx` when the file exists and its suffix names a source."""
    head, sep, _ = spec.partition(":")
    if sep and head.endswith(".py"):  # model.py:factory
        return f"python:{spec}"
    if sep:
        return spec
    prefix = SUFFIX_PREFIX.get(Path(spec).suffix.lower())
    return f"{prefix}:{spec}" if prefix and Path(spec).is_file() else spec
