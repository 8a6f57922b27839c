"""Deployment targets for INT8: which integer kernels an artifact will meet, and whether this machine
can measure them.

Why it matters: onnxruntime's U8S8 kernels on x86 CPUs without VNNI (AVX2, AVX-512F) multiply
u8 activations by s8 weights with `vpmaddubsw`, which adds each *pair* of products into a
saturating int16. Where a pair exceeds 32767 the result is silently clipped and accuracy falls
(onnxruntime documents it; its remedy is 7-bit weights, `reduce_range`). VNNI (`vpdpbusd`), AMX
and ARM's dot-product kernels accumulate in int32 and never saturate. An artifact whose every pair
is bounded inside int16 computes bit-identical results on all of them, which is what makes a
measurement on one x86 CPU valid for another (see saturation.py).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

Target = Literal["auto", "x86-avx2", "x86-vnni", "x86-amx", "arm64", "tensorrt"]
TARGETS: tuple[str, ...] = ("auto", "x86-avx2", "x86-vnni", "x86-amx", "arm64", "tensorrt")

# Accumulation class of the integer GEMM kernels a target runs: "int16-pairs" saturates, "int32" does not.
KERNELS: dict[str, str] = {"x86-avx2": "int16-pairs", "x86-vnni": "int32", "x86-amx": "int32",
                           "arm64": "int32", "tensorrt": "int32"}


@dataclass(frozen=True)
class HostCpu:
    """What this machine is, read once: the ISA target it counts as, its model name and int8 flags."""

    target: str  # one of TARGETS without "auto"; "unknown" on a CPU fmap cannot place
    model: str
    flags: tuple[str, ...]  # the flags that decide int8 kernels: avx2, avx512f, avx512_vnni, avx_vnni, amx_int8

    def to_dict(self) -> dict[str, object]:
        return {"target": self.target, "model": self.model, "flags": list(self.flags)}


INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp")


def target_from_flags(flags: set[str], machine: str = "x86_64") -> str:
    """The best target a CPU with these /proc/cpuinfo flags runs natively."""
    if machine in ("aarch64", "arm64"):
        return "arm64"
    if "amx_int8" in flags:
        return "x86-amx"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "x86-vnni"
    if "avx2" in flags:
        return "x86-avx2"
    return "unknown"


@lru_cache(maxsize=1)
def host_cpu() -> HostCpu:
    """Read /proc/cpuinfo (Linux); elsewhere only the architecture is known."""
    machine = platform.machine().lower()
    model, flags = platform.processor() or machine, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and model in ("", machine):
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return HostCpu(target_from_flags(flags, machine), model,
                   tuple(f for f in INT8_FLAGS if f in flags))


def resolve(target: str) -> str:
    """`auto` -> this machine's target (x86-avx2 when fmap cannot place the CPU: the safe choice)."""
    if target != "auto":
        return target
    host = host_cpu().target
    return host if host in KERNELS else "x86-avx2"


def measurable_here(target: str, artifact_is_saturation_safe: bool, host: str | None = None) -> bool:
    """Can accuracy measured on this machine stand for `target`?

    Same kernel class: yes. Another x86 class: only when no pair can saturate, because then the
    integer results are identical. arm64 and TensorRT run other kernels (and other rounding): no,
    unless this machine is one.
    """
    host = host or host_cpu().target
    if target == host:
        return True
    if target in ("arm64", "tensorrt") or host not in KERNELS or host == "arm64":
        return False
    return KERNELS[target] == KERNELS[host] or artifact_is_saturation_safe


def needs_overflow_fix(target: str) -> bool:
    """Targets whose kernels saturate int16 pairs get 7-bit weights on the layers at risk."""
    return KERNELS.get(target) == "int16-pairs"
