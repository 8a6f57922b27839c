"""What the machine was doing while latency was measured: CPU model, ISA flags, load average.

A latency number without its conditions cannot be trusted: the same model ran 110 ms alone and
317 ms beside another runtime on a loaded 2-core box. Every latency therefore carries the load
average seen around its measurement, and a run measured with more runnable processes than cores
is marked `busy` (and warned about) in every report.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# The ISA extensions that decide which INT8/BF16 kernels a CPU runtime can use.
INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_info() -> dict[str, Any]:
    """CPU model name, the interesting ISA flags present, and the usable core count."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", "", platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu_model": model, "cpu_flags": [f for f in INTERESTING_FLAGS if f in flags], "cores": usable_cores()}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    """1-minute load average (runnable + uninterruptible processes); None where unavailable."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def conditions(before: float | None, after: float | None, cores: int | None = None,
               paused: int | None = None, runnable: list[int | None] | None = None) -> dict[str, Any]:
    """The load around one measurement and whether the machine was busy (load above its cores).

    fmap's own timing loop adds about one runnable process, so `busy` means load > cores + 1
    would double count; we use load > cores, the conservative reading the issue asks for.
    In a sweep that paused its other trials for this measurement (`paused`, pipeline.quiet) the
    1-minute average still remembers them, so busy is read from the threads runnable at the
    start and end instead: more than this process's timing threads (cores) plus one.
    """
    cores = cores or usable_cores()
    seen = [x for x in (before, after) if x is not None]
    peak = max(seen) if seen else None
    out = {"load_avg_1m_before": before, "load_avg_1m_after": after, "cores": cores,
           "busy": bool(peak is not None and peak > cores)}
    if paused is not None:
        now = [r for r in runnable or [] if r is not None]
        out.update(paused_trials=paused, runnable=runnable,
                   busy=bool(now and max(now) > cores + 1) if now else out["busy"])
    return out
