"""Named registries filled by decorators: backends, pruning criteria, model sources, report formats.

One generic helper (after timm's `register_model`) so that adding a backend, a criterion, a source
or a report format is one new file whose decorator registers it; no `if name == ...` chain
elsewhere needs an edit. Built-in entries are found lazily: the first lookup imports every module
of the registry's package that `include` accepts, so `import pipeline` stays light. Plug-ins
(pipeline.plugins) import their own files, whose decorators add to the same registries.

This module sits at the bottom next to `pipeline.contracts`: it imports only `pipeline.errors`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from pipeline.errors import BadInput

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> entry, with built-ins discovered from `package` on first use."""

    def __init__(self, kind: str, package: str | None = None,
                 include: Callable[[str], bool] = lambda module: True, order: tuple[str, ...] = ()) -> None:
        self.kind = kind  # "backend", "report format", ...: used in error messages
        self._package = package
        self._include = include
        self._order = order  # names listed first (in this order) in messages and `names()`
        self._entries: dict[str, T] = {}
        self._discovered = package is None

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; a later registration of the same name replaces it."""
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        self._entries[name] = entry
        return entry

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True  # set first: a built-in module may look itself up while importing
        pkg = importlib.import_module(self._package)  # type: ignore[arg-type]
        for info in pkgutil.iter_modules(pkg.__path__):
            if self._include(info.name):
                importlib.import_module(f"{self._package}.{info.name}")

    def names(self) -> list[str]:
        self._discover()
        rank = {n: i for i, n in enumerate(self._order)}
        return sorted(self._entries, key=lambda n: (rank.get(n, len(rank)), n))

    def get(self, name: str) -> T:
        """The entry for `name`; BadInput (exit 2) naming the known ones when there is none."""
        self._discover()
        if name not in self._entries:
            raise BadInput(self.unknown(name))
        return self._entries[name]

    def unknown(self, name: str) -> str:
        """The one-line message for a name nobody registered."""
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown {self.kind} '{name}' (known: {', '.join(known)}){hint}"

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._entries[n]) for n in self.names()]

    @contextlib.contextmanager
    def scoped(self) -> Iterator[None]:
        """Registrations made inside the block are undone on exit (tests load plug-ins in one process)."""
        self._discover()
        saved = dict(self._entries)
        try:
            yield
        finally:
            self._entries.clear()
            self._entries.update(saved)
