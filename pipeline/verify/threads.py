"""Thread pools that do not spin: set before any runtime starts, so timings do not steal cores.

Interleaved timing runs several runtimes in one process. A pool that busy-waits after each call
(OpenMP's default ACTIVE policy for torch, onnxruntime's intra-op spinning) keeps burning the cores
while the next runtime is being timed, which inflated torch eager from 110 ms to 317 ms in the
issue's measurement. torch reads the OpenMP settings once, when libgomp/libiomp loads, so they
must be in the environment before `import torch`: `fmap`'s entry point calls `quiet_thread_pools`.
onnxruntime and OpenVINO get their equivalents as session options (pipeline.backends).
"""

from __future__ import annotations

import os

QUIET_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",  # GNU and LLVM OpenMP: sleep instead of spinning between calls
    "KMP_BLOCKTIME": "0",  # Intel OpenMP: the same, in milliseconds of spin before sleeping
}


def quiet_thread_pools() -> dict[str, str]:
    """Set the passive-wait variables unless the user set them; returns what is in effect."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in QUIET_ENV}


def thread_env() -> dict[str, str | None]:
    """What the report records: the wait policy the timed process actually ran with."""
    return {key: os.environ.get(key) for key in (*QUIET_ENV, "OMP_NUM_THREADS")}
