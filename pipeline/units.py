"""Units shown to people, in one place so every report and console line agrees.

Sizes are powers of 1024 and labelled as such (KiB, MiB, GiB), as gates' "MB" thresholds are.
Imports nothing of fmap: any layer may use it.
"""

from __future__ import annotations


def human_bytes(n: float | None, missing: str = "n/a") -> str:
    """`151040` -> `147.50 KiB`; whole bytes below 1 KiB; `missing` for None."""
    if n is None:
        return missing
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
