"""Objectives and constraints of a sweep, and their values in a run's report.json.

Every value comes from ONE row of report.json's `artifacts`: the deployable artifact's row (the
one the gates judge), on `backend` when given, else the first deployable row. Names are checked
against METRICS before any trial starts, so a typo is exit 2, not an empty leaderboard.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import BadInput


def _field(name: str, scale: float = 1.0) -> Callable[[dict[str, Any]], float | None]:
    def get(row: dict[str, Any]) -> float | None:
        v = row.get(name)
        return None if v is None else float(v) * scale

    return get


# objective name -> (how to read it from an artifact row, natural direction, unit for reports)
METRICS: dict[str, tuple[Callable[[dict[str, Any]], float | None], str, str]] = {
    "agreement": (_field("agreement"), "max", ""),
    "top1": (_field("top1"), "max", ""),
    "accuracy": (_field("top1"), "max", ""),  # alias of top1
    "top5": (_field("top5"), "max", ""),
    "latency_ms": (_field("p50_ms"), "min", "ms"),  # p50 at the gate batch size
    "p99_ms": (_field("p99_ms"), "min", "ms"),
    "throughput_ips": (_field("throughput_ips"), "max", "img/s"),
    "speedup": (_field("speedup"), "max", "x"),
    "size_mb": (_field("size_bytes", 1e-6), "min", "MB"),
    "max_abs_err": (_field("max_abs_err"), "min", ""),
    "mean_abs_err": (_field("mean_abs_err"), "min", ""),
    "rss_delta_mb": (_field("rss_delta_mb"), "min", "MB"),
}

DEFAULT_OBJECTIVES = ("agreement:max", "latency_ms:min", "size_mb:min")


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "max" | "min"

    def __str__(self) -> str:
        return f"{self.name}:{self.direction}"


@dataclass(frozen=True)
class Constraint:
    name: str
    op: str
    bound: float

    def holds(self, value: float | None) -> bool:
        return value is not None and _OPS[self.op](value, self.bound)

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.bound:g}"


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def _known(name: str, what: str) -> None:
    if name not in METRICS:
        close = difflib.get_close_matches(name, list(METRICS), n=1)
        hint = f", did you mean '{close[0]}'?" if close else ""
        raise BadInput(f"{what}: unknown metric '{name}'{hint} (no report contains it; known: {', '.join(METRICS)})")


def parse_objective(text: str) -> Objective:
    name, sep, direction = text.strip().partition(":")
    _known(name, f"--objective '{text}'")
    direction = direction.strip() if sep else METRICS[name][1]
    if direction not in ("max", "min"):
        raise BadInput(f"--objective '{text}': direction must be 'max' or 'min', got '{direction}'")
    return Objective(name, direction)


def parse_objectives(items: list[str] | tuple[str, ...]) -> list[Objective]:
    objectives = [parse_objective(t) for t in (items or DEFAULT_OBJECTIVES)]
    names = [o.name for o in objectives]
    if len(set(names)) != len(names):
        raise BadInput(f"--objective: a metric is given twice ({', '.join(names)})")
    return objectives


def parse_constraint(text: str) -> Constraint:
    m = _CONSTRAINT.match(text)
    if not m:
        raise BadInput(f"--constraint '{text}': expected NAME OP NUMBER with OP one of >= <= > < ==, "
                       "e.g. 'agreement>=0.99'")
    _known(m[1], f"--constraint '{text}'")
    return Constraint(m[1], m[2], float(m[3]))


def deployable_row(report: dict[str, Any], backend: str | None = None) -> dict[str, Any] | None:
    """The artifact row the objectives are read from (None when the run measured no deployable)."""
    rows = [r for r in report.get("artifacts", []) if r.get("deployable")]
    if backend is not None:
        rows = [r for r in rows if r.get("backend") == backend]
    return rows[0] if rows else None


def values(row: dict[str, Any] | None, names: list[str]) -> dict[str, float | None]:
    """Metric values of one row; None where the run did not measure it (never invented)."""
    return {n: (None if row is None else METRICS[n][0](row)) for n in names}
