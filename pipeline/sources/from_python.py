"""`python:pkg.mod:factory` or `python:path/to/file.py:factory`: the user's own model code.

The recipe's directory and the working directory are importable (as with `python -m`), so a model
module beside the recipe needs no PYTHONPATH. Any failure while importing or calling the user's code
is bad input (exit 2) with one line naming the file and the error, never a traceback.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from typing import Any

from pipeline.errors import BadInput
from pipeline.sources.registry import BuildContext, model_source


def check(rest: str) -> str | None:
    module, sep, attr = rest.rpartition(":")
    if not sep or not module or not attr:
        return ("expected 'python:package.module:factory' or 'python:path/to/file.py:factory' "
                "(module and factory separated by ':')")
    return None


@model_source("python", "python:package.module:factory", check=check)
def build(target: str, kwargs: dict[str, Any], ctx: BuildContext) -> Any:
    import torch

    module_name, _, attr = target.rpartition(":")
    module = _import_file(module_name, target, ctx) if module_name.endswith(".py") else \
        _import_module(module_name, target, ctx)
    factory = getattr(module, attr, None)
    if not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        from pipeline.sources.suggest import suggest

        raise BadInput(f"model 'python:{target}': '{module_name}' has no callable '{attr}'{suggest(attr, public)}")
    try:
        model = factory(**kwargs)
    except SystemExit as exc:  # user code must not pick fmap's exit code
        raise BadInput(f"model 'python:{target}': the factory called sys.exit({exc.code!r})") from None
    except Exception as exc:  # the user's code: report it as bad input, one line
        raise BadInput(f"model 'python:{target}' failed to build: {type(exc).__name__}: {_first(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"model 'python:{target}' returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def _import_module(name: str, target: str, ctx: BuildContext) -> Any:
    ctx.importable()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        where = f" (searched the recipe's directory {ctx.base_dir} and the working directory)" if ctx.base_dir else ""
        raise BadInput(f"model 'python:{target}': cannot import module '{name}': {exc}{where}") from None
    except (Exception, SystemExit) as exc:  # SyntaxError, an ImportError inside it, anything its import runs
        raise _import_failed(target, name, exc) from None


def _import_file(file: str, target: str, ctx: BuildContext) -> Any:
    path = ctx.resolve(file)
    if not path.is_file():
        raise BadInput(f"model 'python:{target}': file '{file}' does not exist")
    path = path.resolve()
    # a stable unique name, so two model files called model.py do not collide in sys.modules
    name = f"fmap_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:  # sibling modules of the file import as they would beside it
        sys.path.insert(0, str(path.parent))
    ctx.importable()
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BadInput(f"model 'python:{target}': '{file}' cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise _import_failed(target, file, exc) from None
    return module


def _import_failed(target: str, what: str, exc: BaseException) -> BadInput:
    """One line for a user module that fails while importing: where a syntax error is, who called exit."""
    if isinstance(exc, SyntaxError):
        where = f"{exc.filename}:{exc.lineno}" if exc.filename else what
        return BadInput(f"model 'python:{target}': syntax error in {where}: {exc.msg}")
    if isinstance(exc, SystemExit):  # user code must not pick fmap's exit code
        return BadInput(f"model 'python:{target}': importing '{what}' called sys.exit({exc.code!r})")
    return BadInput(f"model 'python:{target}': importing '{what}' failed: {type(exc).__name__}: {_first(exc)}")


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]
