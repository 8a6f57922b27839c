"""Plug-ins: Python files or modules whose decorators register backends, prune criteria, model
sources or report formats (docs/architecture.md shows one of each).

Loaded, in this order, from the `FMAP_PLUGINS` environment variable (entries separated by
`os.pathsep`), from `fmap --plugin X` (repeatable), and from a recipe's `plugins:` list (paths
relative to the recipe's folder), before the recipe is validated, so its stage configs can name
what the plug-ins registered. A file is imported once per process however often it is named;
a plug-in that fails to import is bad input (exit 2), with its own error in one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

from pipeline.errors import BadInput

PLUGIN_ENV = "FMAP_PLUGINS"
_LOADED: dict[str, ModuleType] = {}  # what was loaded (absolute path or module name) -> module


def env_plugins() -> list[str]:
    """The plug-ins named in $FMAP_PLUGINS."""
    return [p for p in os.environ.get(PLUGIN_ENV, "").split(os.pathsep) if p.strip()]


def loaded_plugins() -> list[str]:
    """Every plug-in loaded so far, as absolute paths or module names: what a child process
    (verify's isolated timing) loads to see the same registries."""
    return list(_LOADED)


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """Plug-ins loaded inside the block are forgotten on exit, so loading them again re-registers
    them (pair with `Registry.scoped()`)."""
    saved = dict(_LOADED)
    try:
        yield
    finally:
        for key, module in list(_LOADED.items()):
            if key not in saved:
                del _LOADED[key]
                sys.modules.pop(module.__name__, None)


def load_plugins(specs: Iterable[str], base_dir: Path | None = None) -> list[ModuleType]:
    return [load_plugin(spec, base_dir) for spec in specs]


def load_plugin(spec: str, base_dir: Path | None = None) -> ModuleType:
    """Import plug-in `spec`: a `.py` file (relative to `base_dir`, else the working directory)
    or an importable module name (`mypackage.fmap_plugin`)."""
    spec = spec.strip()
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        return _load_file(_resolve(spec, base_dir))
    if spec not in _LOADED:
        try:
            _LOADED[spec] = importlib.import_module(spec)
        except Exception as exc:
            raise BadInput(f"plug-in '{spec}' cannot be imported: {_first_line(exc)}") from None
    return _LOADED[spec]


def _resolve(spec: str, base_dir: Path | None) -> Path:
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).is_file():
        path = base_dir / path
    if not path.is_file():
        where = f" (looked beside the recipe in {base_dir} too)" if base_dir is not None else ""
        raise BadInput(f"plug-in file '{spec}' not found{where}")
    return path.resolve()


def _load_file(path: Path) -> ModuleType:
    key = str(path)
    if key in _LOADED:
        return _LOADED[key]
    name = f"fmap_plugin_{path.stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise BadInput(f"plug-in file '{path}' is not a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise BadInput(f"plug-in file '{path}' failed to load: {_first_line(exc)}") from None
    _LOADED[key] = module
    return module


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
