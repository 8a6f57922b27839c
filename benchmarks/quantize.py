"""INT8 side by side: torch eager, ORT FP32, ORT INT8 by hand, fmap INT8 on ORT and OpenVINO, NNCF.

ResNet-18 and MobileNetV2 (torchvision, random weights: no downloads) at 224, batch 1, 2 threads,
plus the builtin digits CNN (trained, real labels). Random-weight models have no meaningful
accuracy, so they are scored by top-1 agreement with torch FP32 on *structured* random images
(low-frequency random fields, which drive activations like natural images do, unlike white noise),
with the classifier bias centred so that predictions depend on the input (see center_logits).
That agreement is a proxy, not ImageNet accuracy; say so wherever the numbers are quoted.

"ORT INT8 by hand" is what a user gets from the plain recipe: torch.onnx.export, then
quantize_static with its defaults (QDQ, per-tensor, S8S8, MinMax), no pre-processing.

    python benchmarks/quantize.py --quick                 # resnet18 + digits, few samples
    python benchmarks/quantize.py --write                 # all models, section in RESULTS.md
    python benchmarks/quantize.py --variants              # also fmap INT8 with S8S8 activations
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTION = "## Quantization (INT8, CPU, batch 1, 2 threads)"
THREADS = 2


def structured_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Low-frequency random fields plus a little noise, roughly ImageNet-normalised in range."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 7, 7, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return x + 0.1 * torch.randn(n, 3, size, size, generator=g)


def load_case(name: str, calib_n: int, eval_n: int) -> dict[str, Any]:
    from pipeline.sources.data import TensorSplit

    if name == "digits_cnn":
        from pipeline.sources.builtin import digits_splits, pretrained_digits_cnn

        splits = digits_splits()
        xc, yc = splits["calibration"]
        xe, ye = splits["test"]
        return {"model": pretrained_digits_cnn().eval(), "shape": (1, 1, 32, 32),
                "calib": TensorSplit("cal", xc[:calib_n], yc[:calib_n], batch_size=16),
                "eval": TensorSplit("test", xe[:eval_n], ye[:eval_n], batch_size=32, num_classes=10)}
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    calib = TensorSplit("cal", structured_images(calib_n, 224, 1), None, batch_size=16)
    center_logits(model, calib)
    return {"model": model, "shape": (1, 3, 224, 224), "calib": calib,
            "eval": TensorSplit("eval", structured_images(eval_n, 224, 2), None, batch_size=16)}


def center_logits(model: torch.nn.Module, calib) -> None:
    """Set the classifier bias to -W.mean(features) over calibration data.

    A random-weight network predicts (nearly) one class for every input, which makes top-1
    agreement meaningless (100% for any model that keeps the bias). Centring the logits makes the
    prediction depend on the input; the convolutional body, which is what INT8 changes, is untouched.
    """
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    feats: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach()))
    with torch.no_grad():
        for x, _ in calib.batches(16):
            model(x)
        hook.remove()
        head.bias.copy_(-head.weight @ torch.cat(feats).mean(0))


def p50(fn, x: np.ndarray, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn(x)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(x)
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))


def scores(infer, model: torch.nn.Module, split) -> dict[str, Any]:
    agree = correct = n = 0
    classes: set[int] = set()
    for x, y in split.batches(16):
        with torch.no_grad():
            ref = model(x).argmax(1).numpy()
        classes.update(ref.tolist())
        pred = infer(x.numpy()).argmax(1)
        agree += int((pred == ref).sum())
        correct += int((pred == y.numpy()).sum()) if y is not None else 0
        n += len(ref)
    return {"agreement": agree / n, "accuracy": correct / n if split.has_labels else None, "classes": len(classes)}


def fmap_int8(case: dict, work: Path, activation_type: str) -> Path:
    from rich.console import Console

    from pipeline.sources.data import DataBundle
    from pipeline.stages.base import StageContext
    from pipeline.stages.quantize import QuantizeConfig, QuantizeStage

    ctx = StageContext(recipe=None, run_dir=work, model=case["model"], original_model=case["model"],  # type: ignore[arg-type]
                       example_input=torch.zeros(case["shape"]), console=Console(stderr=True, quiet=True),
                       data=DataBundle(calibration=case["calib"], eval=case["eval"]), threads=THREADS)
    cfg = QuantizeConfig(backends=[], latency_iterations=1, samples=len(case["calib"]), debug_samples=2,
                         eval_samples=8, activation_type=activation_type)
    return Path(QuantizeStage().run(ctx, cfg).artifacts["onnx_int8"].path)


def by_hand_int8(case: dict, work: Path) -> Path:
    from onnxruntime.quantization import quantize_static

    from pipeline.quantization.calibration import StreamingReader

    import warnings

    raw = work / "raw.onnx"
    warnings.simplefilter("ignore")
    torch.onnx.export(copy.deepcopy(case["model"]), (torch.zeros(case["shape"]),), str(raw), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "n"}, "output": {0: "n"}})
    out = work / "by_hand_int8.onnx"
    quantize_static(str(raw), str(out), StreamingReader(case["calib"], "input"))
    return out


def nncf_row(case: dict, x1: np.ndarray, warmup: int, iters: int) -> dict[str, Any]:
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return {"variant": "NNCF INT8", "backend": "openvino", "note": "nncf not installed (pip install nncf)"}
    ov_model = ov.convert_model(copy.deepcopy(case["model"]), example_input=torch.zeros(case["shape"]))
    data = nncf.Dataset([x.numpy() for x, _ in case["calib"].batches(1)])
    q = nncf.quantize(ov_model, data)
    compiled = ov.Core().compile_model(q, "CPU", {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()

    def infer(x):
        req.infer({0: x})
        return np.array(req.get_output_tensor(0).data)

    return {"variant": "NNCF INT8", "backend": "openvino", "latency_ms": p50(infer, x1, warmup, iters),
            **scores(lambda x: np.concatenate([infer(x[i:i + 1]) for i in range(len(x))]), case["model"], case["eval"])}


def run_case(name: str, quick: bool, variants: bool) -> list[dict[str, Any]]:
    from pipeline.backends import onnxruntime as ort_b
    from pipeline.backends import openvino as ov_b
    from pipeline.export.onnx import export_onnx

    calib_n, eval_n = (16, 32) if quick else (64, 256)
    warmup, iters = (3, 10) if quick else (10, 100)
    case = load_case(name, calib_n, eval_n)
    torch.set_num_threads(THREADS)
    x1 = np.zeros(case["shape"], np.float32) + structured_images(1, case["shape"][-1], 3)[:, : case["shape"][1]].numpy()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=f"fmap-bench-{name}-") as tmp:
        work = Path(tmp)

        def torch_infer(x):
            with torch.no_grad():
                return case["model"](torch.from_numpy(x)).numpy()

        rows.append({"variant": "torch eager FP32", "backend": "torch",
                     "latency_ms": p50(torch_infer, x1, warmup, iters), **scores(torch_infer, case["model"], case["eval"])})
        fp32 = export_onnx(case["model"], torch.from_numpy(x1), work / "fp32.onnx")
        files = [("ORT FP32", fp32, "fp32", [ort_b]), ("OpenVINO FP32", fp32, "fp32", [ov_b]),
                 ("ORT INT8 by hand (quantize_static defaults)", by_hand_int8(case, work), "int8", [ort_b])]
        files.append(("fmap INT8 (U8S8 QDQ)", fmap_int8(case, work / "u8", "quint8"), "int8", [ort_b, ov_b]))
        if variants:
            files.append(("fmap INT8 (S8S8 QDQ)", fmap_int8(case, work / "s8", "qint8"), "int8", [ort_b, ov_b]))
        for label, path, precision, backends in files:
            for b in backends:
                sess = b.load(path, threads=THREADS, precision_hint=precision)
                row = {"variant": label, "backend": sess.backend, "latency_ms": p50(sess.infer, x1, warmup, iters),
                       **scores(sess.infer, case["model"], case["eval"])}
                if sess.backend == "openvino":
                    row["note"] = "exec " + ",".join(f"{k}:{v}" for k, v in sess.describe()["execution_precision"].items())
                rows.append(row)
                sess.close()
        rows.append(nncf_row(case, x1, warmup, iters))
    for r in rows:
        r["model"] = name
    return rows


def fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.2f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | variant | backend | p50 ms | agreement vs torch | accuracy | FP32 classes seen | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['backend']} | {fmt(r.get('latency_ms'))} | "
                     f"{fmt(r.get('agreement'), True)} | {fmt(r.get('accuracy'), True)} | {r.get('classes', '-')} | "
                     f"{r.get('note', '')} |")
    return lines


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    from pipeline.atomic import write_text

    import onnxruntime
    import openvino

    section = "\n".join([
        SECTION, "",
        f"onnxruntime {onnxruntime.__version__}, OpenVINO {openvino.get_version().split('-')[0]}, torch {torch.__version__}; "
        f"`python benchmarks/quantize.py --write`. torchvision models have random weights: agreement is top-1 "
        "agreement with torch FP32 on structured random images (low-frequency fields) after centring the "
        "classifier bias so predictions depend on the input (`FP32 classes seen` shows they do); a proxy, not "
        "ImageNet accuracy. digits_cnn is trained and scored on its real test split.", "", *table(rows)]) + "\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_text(path, text)


def main() -> int:
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # ORT's "consider pre-processing" advice, wanted here
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="resnet18 + digits_cnn, few samples and iterations")
    ap.add_argument("--variants", action="store_true", help="also fmap INT8 with S8S8 activations")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = ap.parse_args()
    models = args.models or (["resnet18", "digits_cnn"] if args.quick else ["resnet18", "mobilenet_v2", "digits_cnn"])
    rows: list[dict[str, Any]] = []
    for name in models:
        print(f"[quantize bench] {name}", file=sys.stderr)
        rows.extend(run_case(name, args.quick, args.variants))
    print("\n".join(table(rows)))
    if args.write:
        write_results(rows, ROOT / "benchmarks" / "RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
