"""The Pareto front: points no other point beats on every objective at once."""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """True when `a` is at least as good as `b` on every objective and strictly better on one."""
    better = False
    for x, y, d in zip(a, b, directions):
        if d == "min":
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def front(points: dict[str, Sequence[float]], directions: Sequence[str]) -> list[str]:
    """Ids of the non-dominated points, in the input order. O(n^2), fine for sweep sizes."""
    return [i for i, p in points.items()
            if not any(dominates(q, p, directions) for j, q in points.items() if j != i)]
