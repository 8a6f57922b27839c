"""`--grid KEY=V1,V2,...` parsing and the trials of a sweep (the cartesian product of the grids).

Values are YAML scalars or flow collections, like `--set` values: `stages.verify.latency.batch_sizes=[1],[1,8]`
gives two values because commas inside brackets do not split.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.errors import BadInput


@dataclass(frozen=True)
class Grid:
    key: str
    values: tuple[str, ...]  # raw text of each value, exactly as it goes into `--set KEY=VALUE`


@dataclass(frozen=True)
class Trial:
    """One point of the sweep: its id (also its directory name) and the overrides that define it."""

    id: str
    params: dict[str, Any] = field(hash=False)  # key -> parsed value, for reports
    overrides: tuple[str, ...] = ()  # the `--set` items, sweep-wide ones first


def split_values(text: str) -> list[str]:
    """Split on commas that are not inside [] or {} (so YAML lists stay one value)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def parse_grid(item: str) -> Grid:
    """Parse one `--grid KEY=V1,V2`; BadInput (exit 2) on a missing key or an empty value."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise BadInput(f"--grid '{item}': expected KEY=V1,V2,... e.g. --grid stages.prune.amount=0.3,0.5")
    return Grid(key, parse_values(raw, f"--grid '{item}'", "value"))


def parse_values(raw: str, where: str, what: str) -> tuple[str, ...]:
    """Comma-separated YAML values (grid values, --param choices); a repeated one counts once."""
    values = split_values(raw)
    if not raw.strip() or any(not v for v in values):
        raise BadInput(f"{where}: empty {what} list or empty {what} (expected KEY=V1,V2,...)")
    for v in values:
        try:
            yaml.safe_load(v)
        except yaml.YAMLError:
            raise BadInput(f"{where}: {what} '{v}' is not valid YAML") from None
    return tuple(dict.fromkeys(values))


def parse_grids(items: list[str] | tuple[str, ...]) -> list[Grid]:
    grids = [parse_grid(i) for i in items]
    seen: set[str] = set()
    for g in grids:
        if g.key in seen:
            raise BadInput(f"--grid '{g.key}' is given twice (put every value in one --grid)")
        seen.add(g.key)
    return grids


def trials(grids: list[Grid], base_overrides: tuple[str, ...] = ()) -> list[Trial]:
    """The product of the grids, in order (the first grid varies slowest). No grid: one trial."""
    out: list[Trial] = []
    for combo in itertools.product(*(g.values for g in grids)):
        items = tuple(f"{g.key}={v}" for g, v in zip(grids, combo))
        params = {g.key: yaml.safe_load(v) for g, v in zip(grids, combo)}
        out.append(Trial(trial_id(items), params, base_overrides + items))
    return out


def trial_id(items: tuple[str, ...]) -> str:
    """A readable, stable directory name: last key segments and values, plus a short hash of the
    full overrides, so the same point keeps its directory when the grid is extended (resume)."""
    digest = hashlib.sha256("\n".join(items).encode()).hexdigest()[:6]
    slug = "_".join(f"{_clean(k.rsplit('.', 1)[-1])}-{_clean(v)}" for k, _, v in (i.partition("=") for i in items))
    slug = slug.strip("-_")[:60]
    return f"{slug}_{digest}" if slug else f"trial_{digest}"


def _clean(text: str) -> str:
    """Characters safe in a directory name and a URL: `[1, 3, 32]` -> `1-3-32`."""
    return re.sub(r"[^A-Za-z0-9.+]+", "-", text).strip("-")
