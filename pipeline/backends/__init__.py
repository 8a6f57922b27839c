"""Backend registry: name -> `Backend` (pipeline.backends.base), built-ins imported on first use.

A backend whose library is missing is not an error here: `available(name)` returns the reason
as a string, so verify can show it as a visible skip instead of crashing or hiding it. Adding a
backend is one file with an `@backend(...)` load function (here or in a plug-in).
"""

from __future__ import annotations

from pipeline.backends.base import BACKENDS, Backend


def get_backend(name: str) -> Backend:
    """The registered backend (BadInput naming the known ones for an unknown name)."""
    return BACKENDS.get(name)


def backend_names() -> list[str]:
    return BACKENDS.names()


def loads(name: str) -> tuple[str, ...]:
    """Artifact kinds backend `name` can run (verify pairs artifacts with backends by it)."""
    return BACKENDS.get(name).loads if name in BACKENDS else ()


def available(name: str) -> str | None:
    """None when `name` can run here, else a one-line reason why not."""
    if name not in BACKENDS:
        return BACKENDS.unknown(name)
    try:
        return BACKENDS.get(name).available()
    except Exception as exc:  # a probe must never crash verify
        return f"{name} availability check failed: {type(exc).__name__}: {exc}"


def registered_names(names: list[str]) -> list[str]:
    """`names` if every one is a registered backend (built-in or plug-in), else ValueError naming
    them all: the pydantic validator of every config key that lists backends."""
    known = backend_names()
    unknown = [b for b in names if b not in known]
    if unknown:
        raise ValueError(f"unknown backend '{unknown[0]}' (expected {' | '.join(repr(n) for n in known)})")
    return names
