"""Atomic artifact writes: write to a temp file in the same directory, fsync, then rename.

A crashed or interrupted run therefore never leaves a half-written artifact under its final name,
which is what makes `fmap run --resume` safe.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Every temp name fmap creates contains this marker plus the writer's pid, so a later run can tell
# its own temp files from a killed run's orphans (pipeline.rundir.remove_orphans).
TEMP_MARK = ".fmaptmp"


def temp_prefix(final: Path) -> str:
    """`.<name>.fmaptmp<pid>.`: hidden, per process, recognisable as fmap's."""
    return f".{final.name}{TEMP_MARK}{os.getpid()}."


class DiskFull(OSError):
    """No space left while writing `path`; carries a one-line message for the user."""


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    Use it for libraries that insist on writing to a path themselves (onnx.save, torch.save,
    matplotlib's savefig, onnxruntime's quantizer). The temp name keeps the final suffix, because
    several of those libraries pick a format from it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=temp_prefix(final), suffix=suffix if suffix is not None else final.suffix, dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        if exc.errno == errno.ENOSPC and not isinstance(exc, DiskFull):
            raise DiskFull(errno.ENOSPC, f"no space left on device while writing {final}") from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(path, dumps_json(obj))


def dumps_json(obj: Any) -> str:
    """The JSON text fmap writes (indented, numpy scalars and paths converted, final newline)."""
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def _json_default(obj: Any) -> Any:
    """Make numpy scalars/arrays and paths JSON-serialisable without every caller converting."""
    if isinstance(obj, Path):
        return str(obj)
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover - numpy is a hard dependency
        pass
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
