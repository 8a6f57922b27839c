"""Shared helpers for benchmark scripts: machine description, interleaved timing, RESULTS.md sections.

Timing reuses fmap's own verify code (pipeline.verify.latency): warmup, round-robin interleaving
across variants (drift and other processes hit every variant alike), bootstrap CIs of the median
and paired bootstrap CIs of speedups. A benchmark and a `fmap run` therefore measure the same way.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as the RSS probe's child process: make `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.verify.latency import measure, speedup_ci, summarize

__all__ = ["machine", "machine_line", "cpu_flags", "versions", "time_interleaved", "speedup_ci", "summarize",
           "file_size", "write_section", "fmt_ms", "fmt_mb", "peak_rss_fresh"]

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> dict[str, Any]:
    """CPU model (from /proc/cpuinfo), logical CPU count, OS, Python, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            found = re.search(r"^model name\s*:\s*(.+)$", fh.read(), re.M)
            cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "date": _dt.date.today().isoformat()}


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the libraries a benchmark depends on (missing ones say so)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "torchvision", "torch-pruning", "onnx", "onnxruntime", "openvino", "nncf", *extra)
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def cpu_flags() -> str:
    """The ISA flags that decide which CPU kernels run (a benchmark's header records them)."""
    from pipeline.verify.machine import INTERESTING_FLAGS, cpu_info

    return ", ".join(cpu_info()["cpu_flags"]) or f"none of {'/'.join(INTERESTING_FLAGS)}"


def machine_line(threads: int) -> str:
    m = machine()
    libs = ", ".join(f"{k} {v}" for k, v in versions().items())
    return (f"{m['date']}; {m['cpu']} ({m['logical_cpus']} logical CPUs), {threads} threads per session; "
            f"{m['os']}, Python {m['python']}; {libs}.")


def time_interleaved(runners: Mapping[str, Callable[[], Any]], batch_size: int, warmup: int,
                     iterations: int) -> tuple[dict[str, dict[str, Any]], dict[str, list[float]]]:
    """Round-robin timing of every runner; returns (summary per name, raw ms samples per name)."""
    raw = measure(runners, warmup=warmup, iterations=iterations, interleave=True)
    return {name: summarize(t, batch_size) for name, t in raw.items()}, raw


def file_size(*paths: str | Path) -> int:
    """Bytes on disk of an artifact (e.g. an OpenVINO IR is its .xml plus .bin)."""
    return sum(Path(p).stat().st_size for p in paths if Path(p).is_file())


def write_section(section: str, heading: str, path: Path = RESULTS) -> None:
    """Replace the `heading` section of RESULTS.md with `section` (which starts with `heading`),
    keeping every other script's section; append it if absent. Written atomically."""
    from pipeline.atomic import write_text

    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = section.rstrip("\n") + "\n"
    if heading in text:
        head, _, rest = text.partition(heading)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_text(path, text)


def fmt_ms(summary: dict[str, Any] | None) -> str:
    """'1.23 [1.20, 1.27]': p50 and its bootstrap 95% CI in milliseconds."""
    if not summary:
        return "-"
    lo, hi = summary["ci95_ms"]
    return f"{summary['p50_ms']:.2f} [{lo:.2f}, {hi:.2f}]"


def fmt_mb(n_bytes: float | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**20:.2f}"


def peak_rss_fresh(backend: str, path: str | Path, shape: list[int], source: str | None = None,
                   threads: int = 2, batch: int = 8, timeout: float = 300) -> dict[str, int] | None:
    """Peak RSS (VmHWM) of a fresh process that imports `backend`, loads `path` and runs 3 batches of `batch`.

    Returns {"peak_rss_bytes", "import_rss_bytes"} (the latter: RSS right after importing the
    runtime, before loading), or None if the child failed. A fresh process per artifact is the only
    way to attribute a high-water mark to one variant; this module does not import torch, so an
    onnxruntime/OpenVINO child carries only its own runtime. backend "torch": `path` is a
    state_dict for the fmap model spec `source`.
    """
    cmd = [sys.executable, __file__, "--rss-child", backend, str(path), ",".join(map(str, shape)),
           str(threads), str(batch), source or ""]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def _rss_child(backend: str, path: str, shape: str, threads: str, batch: str, source: str) -> None:
    import numpy as np

    from pipeline.verify.latency import current_rss_bytes

    n_threads = int(threads)
    if backend == "torch":
        import torch

        from pipeline.recipe_models import ModelConfig
        from pipeline.sources.models import build_model

        torch.set_num_threads(n_threads)
        base = current_rss_bytes()
        model = build_model(ModelConfig(source=source, weights=path))

        def infer(x: np.ndarray) -> None:
            with torch.inference_mode():
                model(torch.from_numpy(x))
    else:
        import importlib

        importlib.import_module(backend)  # the runtime itself, before the artifact
        base = current_rss_bytes()
        mod = importlib.import_module(f"pipeline.backends.{backend}")
        infer = mod.load(path, threads=n_threads, precision_hint="int8" if "int8" in Path(path).name else "fp32").infer
    dims = [int(d) for d in shape.split(",")]
    x = np.zeros([int(batch), *dims[1:]], np.float32)
    for _ in range(3):
        infer(x)
    print(json.dumps({"peak_rss_bytes": _high_water_bytes(), "import_rss_bytes": base}))


def _high_water_bytes() -> int:
    """This process's peak RSS. VmHWM belongs to the address space, which exec replaces; ru_maxrss
    does not reset on exec, so a child forked from a big parent would report the parent's size."""
    try:
        with open("/proc/self/status") as fh:
            found = re.search(r"^VmHWM:\s+(\d+) kB", fh.read(), re.M)
        if found:
            return int(found.group(1)) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


if __name__ == "__main__" and sys.argv[1:2] == ["--rss-child"]:
    _rss_child(*sys.argv[2:8])
