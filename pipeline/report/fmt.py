"""Number formatting shared by the Markdown and HTML reports (one place, so they read the same)."""

from __future__ import annotations

from typing import Any

from pipeline.units import human_bytes


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def ms_ci(v: float | None, ci: list[float] | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f} ms" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def ratio_ci(v: float | None, ci: list[float] | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def size(b: int | float | None) -> str:
    return human_bytes(b)


def num(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def gate_value(g: dict[str, Any]) -> str:
    return "not measured" if g.get("value") is None else f"{g['value']:.4g}"


def gate_op(name: str) -> str:
    return ">=" if name.startswith("min_") else "<="


STATUS_ICON = {"pass": "✅ pass", "fail": "❌ fail", "none": "–"}


def verdict(report: dict) -> tuple[str, str]:
    """(state, text) of a report's headline: "pass", "fail" or "none" (a run without gates checked
    nothing, so it gets no pass banner)."""
    s = report["summary"]
    if s["gates_failed"]:
        return "fail", f"{s['gates_failed']} of {s['gates_total']} gates failed"
    if report.get("status") not in (None, "ok"):
        return "fail", f"run status: {report['status']}"
    if not s["gates_total"]:
        return "none", "no gates configured: the run finished, nothing was checked against a threshold"
    return "pass", f"all {s['gates_total']} gates passed"
