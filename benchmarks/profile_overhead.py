"""Profiler overhead: plain inference over N calibration batches vs the same with channel statistics.

Goal: streaming statistics (mean |a|, APoZ, variance, dead, correlation) cost <= 1.3x plain
inference. HRank ranks (an SVD per feature map on a subsample) are timed separately.

    .venv/bin/python benchmarks/profile_overhead.py [--quick] [--write] [--threads N] [--cpu-time]

--write replaces the "## Profiler overhead" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.profiling.stats import collect_channel_stats  # noqa: E402


def _models(quick: bool) -> list[tuple[str, torch.nn.Module, list[int], int, int]]:
    import torchvision

    from pipeline.sources.builtin import DigitsCNN

    size = 112 if quick else 224
    n = 2 if quick else 8
    return [("digits_cnn (small CNN)", DigitsCNN(), [1, 32, 32], 64, n),
            (f"resnet18 @ {size}", torchvision.models.resnet18(weights=None), [3, size, size], 8, n)]


_CLOCK = time.perf_counter  # --cpu-time: time.process_time, steadier on a shared machine (1 thread)


def _time(fn) -> float:
    t = _CLOCK()
    fn()
    return _CLOCK() - t


def run(quick: bool) -> str:
    torch.manual_seed(0)
    rows = []
    for name, model, shape, bs, n in _models(quick):
        model.eval()
        batches = [torch.randn(bs, *shape) for _ in range(n)]

        def plain() -> None:
            with torch.no_grad():
                for x in batches:
                    model(x)

        plain()  # warm-up
        t_plain = min(_time(plain) for _ in range(2))
        t_stats = min(_time(lambda: collect_channel_stats(model, batches, rank_samples=0)) for _ in range(2))
        t_rank = _time(lambda: collect_channel_stats(model, batches, rank_samples=min(64, bs * n)))
        rows.append(f"| {name} | {n} x {bs} | {t_plain:.3f} | {t_stats:.3f} | {t_stats / t_plain:.2f}x | "
                    f"{t_rank / t_plain:.2f}x |")
    cmd = "python benchmarks/profile_overhead.py" + (" --quick" if quick else "")
    cmd += " --cpu-time" if _CLOCK is time.process_time else ""
    load = _load_note()
    return "\n".join([
        "## Profiler overhead", "",
        f"`{cmd}` ({torch.get_num_threads()} threads, torch {torch.__version__}, {load}). "
        "Goal: stats <= 1.3x plain.", "",
        "| model | batches x size | plain s | with stats s | overhead | with stats + ranks (64 samples) |",
        "|---|---|---|---|---|---|", *rows, ""])


def _load_note() -> str:
    """The 1-minute load at the end of the run: timings on a busy machine are not final."""
    load = os.getloadavg()[0]
    busy = load >= 0.75 * (os.cpu_count() or 1)
    return f"load {load:.2f} on {os.cpu_count()} cores" + (": machine busy, numbers not final" if busy else "")


def write_section(section: str, path: Path) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(r"^## Profiler overhead\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    from pipeline.atomic import write_text

    write_text(path, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small inputs, 2 batches: a smoke test")
    ap.add_argument("--write", action="store_true", help="replace the section in benchmarks/RESULTS.md")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--cpu-time", action="store_true", help="process CPU time instead of wall time")
    args = ap.parse_args()
    global _CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        _CLOCK = time.process_time
    section = run(args.quick)
    print(section)
    if args.write:
        write_section(section, ROOT / "benchmarks" / "RESULTS.md")


if __name__ == "__main__":
    main()
