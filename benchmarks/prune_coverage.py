"""Prune coverage over torchvision's classification models (random weights, no downloads).

For each model: collect activation statistics on two random batches, prune 30% of channels with
the `activation` criterion (classifier protected, attention heads handled), check the forward
shape, export to ONNX (opset 17, dynamo=False) and compare onnxruntime against torch. A model
that fails is reported with the step and the reason; the script never crashes on one model.

    python benchmarks/prune_coverage.py --quick            # 4 representative models
    python benchmarks/prune_coverage.py --write            # every model, section in RESULTS.md
    python benchmarks/prune_coverage.py --models vit_b_16 swin_t
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUICK = ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "vit_b_32"]
# 224 px: ViT position embeddings and MaxViT partitions are fixed; AlexNet/VGG end in an adaptive
# pool to 6x6/7x7 that ONNX exports only when the feature map is a multiple of it.
FIXED_224 = ("vit_", "maxvit_", "alexnet", "vgg")
MIN_INPUT = {"inception_v3": 80}  # its stem needs >= 75 px
CNN_INPUT = 64  # smallest size every other model accepts: keeps the run short on a shared CPU


def input_size(name: str) -> int:
    """The smallest input side each model accepts (the coverage is about graphs, not accuracy)."""
    if name.startswith(FIXED_224):
        return 224
    return MIN_INPUT.get(name, CNN_INPUT)
SECTION = "## Prune coverage (torchvision classification models)"


def check_model(name: str, ratio: float = 0.3) -> dict:
    """Prune one model end to end; returns {name, ok, step, reason, params_before, params_after, seconds}."""
    import onnxruntime as ort
    import torchvision

    from pipeline.pruning.engine import PruneSettings, default_protection, prune_copy
    from pipeline.profiling.stats import collect_channel_stats

    t0 = time.perf_counter()
    row = {"name": name, "ok": False, "step": "build", "reason": ""}
    try:
        torch.manual_seed(0)
        kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
        size = input_size(name)
        x = torch.randn(1, 3, size, size)
        row["step"] = "stats"
        stats = collect_channel_stats(model, [torch.randn(2, 3, size, size) for _ in range(2)])
        row["step"] = "prune"
        pruned = prune_copy(model, x, ratio, PruneSettings(criterion="activation"),
                            default_protection(model, x), stats)
        row["params_before"] = sum(p.numel() for p in model.parameters())
        row["params_after"] = sum(p.numel() for p in pruned.parameters())
        if row["params_after"] >= row["params_before"]:
            raise RuntimeError("nothing was pruned")
        row["step"] = "forward"
        with torch.no_grad():
            ref = pruned(x)
        if ref.shape != model(x).shape:
            raise RuntimeError(f"output shape {tuple(ref.shape)} != original {tuple(model(x).shape)}")
        row["step"] = "onnx"
        buf = io.BytesIO()
        torch.onnx.export(pruned, (x,), buf, opset_version=17, dynamo=False, input_names=["x"])
        sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
        out = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
        err = (out - ref).abs().max().item()
        scale = ref.abs().max().item() + 1e-6
        if err > 1e-3 * max(1.0, scale):
            raise RuntimeError(f"onnxruntime differs from torch by {err:.2e}")
        row.update(ok=True, step="done")
    except Exception as exc:  # report, never crash: the point is the list of what fails and why
        row["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if "--trace" in sys.argv:
            traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _isolated(name: str, args: argparse.Namespace) -> dict:
    """Run check_model in a subprocess, so a torch-pruning hang or crash costs one row, not the run."""
    cmd = [sys.executable, __file__, "--one", name, "--threads", str(args.threads)] + (["--trace"] if args.trace else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "ok": False, "step": "prune", "seconds": args.timeout,
                "reason": f"timed out after {args.timeout}s (torch-pruning graph analysis does not finish)"}
    if args.trace:
        sys.stderr.write(proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"name": name, "ok": False, "step": "crash", "seconds": round(time.perf_counter() - t0, 1),
                "reason": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def write_results(rows: list[dict], path: Path) -> None:
    from pipeline.atomic import write_text

    ok = [r["name"] for r in rows if r["ok"]]
    lines = [SECTION, "", f"{len(ok)}/{len(rows)} models pruned 30% (activation criterion), forward shape "
             "checked, exported to ONNX and matched by onnxruntime.", "",
             "| model | result | params before -> after | note |", "|---|---|---|---|"]
    for r in rows:
        params = (f"{r['params_before'] / 1e6:.2f}M -> {r['params_after'] / 1e6:.2f}M"
                  if "params_after" in r else "")
        lines.append(f"| {r['name']} | {'pass' if r['ok'] else 'FAIL at ' + r['step']} | {params} | "
                     f"{r['reason'].replace('|', '/')} |")
    section = "\n".join(lines) + "\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_text(path, text)


def main() -> int:
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--models", nargs="*", help="explicit model names")
    ap.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trace", action="store_true", help="print tracebacks of failures")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per model (each runs in a subprocess)")
    ap.add_argument("--jsonl", type=Path, help="append each row to this file as it finishes; models already "
                    "in it are not run again (resume an interrupted sweep)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: check one model, print JSON
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print("\n" + json.dumps(check_model(args.one)))
        return 0
    names = args.models or (QUICK if args.quick else sorted(torchvision.models.list_models(module=torchvision.models)))
    rows = []
    done = {}
    if args.jsonl and args.jsonl.exists():  # resume an interrupted sweep: keep the rows already written
        for line in args.jsonl.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["name"]] = row
    for name in names:
        if name in done:
            rows.append(done[name])
            continue
        row = _isolated(name, args)
        rows.append(row)
        if args.jsonl:
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
        status = "pass" if row["ok"] else f"FAIL at {row['step']}: {row['reason']}"
        print(f"{name:28s} {row['seconds']:6.1f}s  {status}", flush=True)
    print(f"\n{sum(r['ok'] for r in rows)}/{len(rows)} passed")
    if args.write:
        write_results(rows, ROOT / "benchmarks" / "RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
