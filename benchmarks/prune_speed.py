"""Latency of pruned vs unpruned ResNet-18 / MobileNetV2 (torch eager and onnxruntime, CPU).

Grid: model x MACs reduction (30%, 50%) x criterion (activation, l2) x round_to (None, 8), at
batch 1 and 8, 2 threads, 224x224, random weights. Goal: >= 1.6x onnxruntime speedup at 50% MACs
on ResNet-18.

    python benchmarks/prune_speed.py --quick     # resnet18, 50%, activation, bs 1, few iterations
    python benchmarks/prune_speed.py             # the full grid (slow: run on a quiet machine)
"""

from __future__ import annotations

import argparse
import io
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def latency(model: torch.nn.Module, bs: int, threads: int, warmup: int, iters: int) -> dict[str, float]:
    """Median ms per batch in torch eager and onnxruntime (CPU, `threads` intra-op threads)."""
    import onnxruntime as ort

    x = torch.randn(bs, 3, 224, 224)
    with torch.no_grad():
        t_torch = _time(lambda: model(x), warmup, iters)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, opset_version=17, dynamo=False, input_names=["x"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    t_ort = _time(lambda: sess.run(None, feed), warmup, iters)
    return {"torch_ms": t_torch, "ort_ms": t_ort}


def main() -> int:
    import torchvision

    from pipeline.pruning.engine import PruneSettings, default_protection, prune_to_target
    from pipeline.profiling.stats import collect_channel_stats
    from pipeline.pruning.measure import model_cost

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--amounts", type=float, nargs="*", default=[0.3, 0.5], help="MACs reductions in the grid")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--write", action="store_true", help="replace the section in benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        grid = [("resnet18", 0.5, "activation", None)]
        batch_sizes, warmup, iters = [1], 2, 5
    else:
        grid = list(itertools.product(["resnet18", "mobilenet_v2"], args.amounts, ["activation", "l2"], [None, 8]))
        batch_sizes, warmup, iters = [1, 8], 10, args.iters
    x1 = torch.randn(1, 3, 224, 224)
    base_cache: dict[tuple[str, int], dict[str, float]] = {}
    lines = ["| model | MACs cut | criterion | round_to | bs | MACs reduction | torch ms (base -> pruned) | "
             "ORT ms (base -> pruned) | ORT speedup |", "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for name, amount, criterion, round_to in grid:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        stats = collect_channel_stats(model, [torch.randn(4, 3, 224, 224) for _ in range(2)])
        settings = PruneSettings(criterion=criterion, round_to=round_to)
        found = prune_to_target(model, x1, "macs", amount, settings, default_protection(model, x1), stats)
        red = 1 - model_cost(found.model, x1)["macs"] / model_cost(model, x1)["macs"]
        for bs in batch_sizes:
            if (name, bs) not in base_cache:
                base_cache[(name, bs)] = latency(model, bs, args.threads, warmup, iters)
            b, p = base_cache[(name, bs)], latency(found.model.eval(), bs, args.threads, warmup, iters)
            lines.append(f"| {name} | {amount:.0%} | {criterion} | {round_to} | {bs} | {red:.1%} | "
                         f"{b['torch_ms']:.1f} -> {p['torch_ms']:.1f} | {b['ort_ms']:.1f} -> {p['ort_ms']:.1f} | "
                         f"{b['ort_ms'] / p['ort_ms']:.2f}x |")
            print(lines[-1], flush=True)
    if args.write:
        from benchmarks.common import machine_line, write_section

        heading = "## Pruning speed (benchmarks/prune_speed.py)"
        cmd = "python benchmarks/prune_speed.py " + " ".join(sys.argv[1:])
        write_section("\n".join([heading, "", f"Command: `{cmd}` · {machine_line(args.threads)} · "
                                 f"median of {iters} runs after {warmup} warmup, 224x224, random weights. "
                                 "Base and pruned are timed one after the other in the same process.", "",
                                 *lines]), heading)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
