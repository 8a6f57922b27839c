"""INT8 side by side: torch eager, ORT FP32, ORT INT8 by hand, fmap INT8 on ORT and OpenVINO, NNCF.

ResNet-18 and MobileNetV2 (torchvision, random weights: no downloads) at 224, batch 1, 2 threads,
plus the builtin digits CNN (trained, real labels).

Protocol for the random-weight models (applied to every variant alike):
- images are real photos (benchmarks/images.py: crops of the photos bundled in scikit-learn and
  scikit-image), calibration crops seed 1, eval crops seed 0;
- the classifier bias is centred on the calibration features so predictions depend on the input
  (see center_logits); the body is untouched;
- BatchNorm statistics are NOT re-estimated by default. `--bn-recal` does it (train-mode passes over
  the calibration photos, then eval) to show why: with unit-variance pre-activations in every layer a
  random network is chaotic, so FP32 itself flips most top-1 decisions under 1 grey level of input
  noise, and agreement stops measuring INT8;
- the `noise floor` row is FP32 with Gaussian input noise of one 8-bit grey level
  (sigma = 1/255 / 0.226 in normalised units): the agreement that an imperceptible perturbation costs.
  An INT8 agreement near it is as good as this proxy can tell.
Agreement is top-1 agreement with torch FP32; it is a proxy, not ImageNet accuracy.

"ORT INT8 by hand" is what a user gets from the plain recipe: torch.onnx.export, then
quantize_static with its defaults (QDQ, per-tensor, S8S8, MinMax), no pre-processing.
Latencies are interleaved round-robin (pipeline.verify.latency), so machine load hits all alike.

    python benchmarks/quantize.py --quick                 # resnet18 + digits, few samples
    python benchmarks/quantize.py --write                 # all models, section in RESULTS.md
    python benchmarks/quantize.py --variants              # also S8S8 and the accuracy options
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTION = "## Quantization (INT8, CPU, batch 1, 2 threads)"
THREADS = 2
GREY_LEVEL = 1 / 255 / 0.226  # one 8-bit grey level in ImageNet-normalised units (mean std)
# fmap INT8 variants: label -> QuantizeConfig overrides (the first is the default recipe)
FMAP_VARIANTS: dict[str, dict[str, Any]] = {
    "fmap INT8 (U8S8 QDQ)": {},
    "fmap INT8 + bias correction": {"bias_correction": True},
    "fmap INT8 + CLE (ReLU6 exact) + BC": {"equalization": True, "bias_correction": True},
    "fmap INT8 + BC, depthwise float": {"bias_correction": True, "keep_float": ["depthwise"]},
    "fmap INT8 (S8S8 QDQ)": {"activation_type": "qint8"},
}


def load_case(name: str, calib_n: int, eval_n: int, bn_recal: bool = False) -> dict[str, Any]:
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

    from benchmarks.images import bundled_images

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    calib = TensorSplit("cal", bundled_images(calib_n, seed=1), None, batch_size=16)
    if bn_recal:
        recalibrate_bn(model, calib)
    center_logits(model, calib)
    return {"model": model, "shape": (1, 3, 224, 224), "calib": calib,
            "eval": TensorSplit("eval", bundled_images(eval_n, seed=0), None, batch_size=16)}


def recalibrate_bn(model: torch.nn.Module, calib) -> None:
    """Re-estimate BatchNorm running statistics on `calib` (cumulative average), then eval mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for x, _ in calib.batches(16):
            model(x)
    model.eval()


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


def noise_floor_row(case: dict) -> dict[str, Any]:
    """FP32 under one grey level of Gaussian input noise: what an imperceptible change costs."""
    g = np.random.default_rng(0)

    def noisy(x: np.ndarray) -> np.ndarray:
        xn = x + (GREY_LEVEL * g.standard_normal(x.shape)).astype(np.float32)
        with torch.no_grad():
            return case["model"](torch.from_numpy(xn)).numpy()

    return {"variant": "noise floor: FP32 + 1 grey level input noise", "backend": "torch",
            **scores(noisy, case["model"], case["eval"])}


def fmap_int8(case: dict, work: Path, overrides: dict[str, Any]) -> Path:
    from rich.console import Console

    from pipeline.sources.data import DataBundle
    from pipeline.stages.base import StageContext
    from pipeline.stages.export import ExportConfig, ExportStage
    from pipeline.stages.quantize import QuantizeConfig, QuantizeStage

    ctx = StageContext(run_dir=work, model=case["model"], original_model=case["model"],
                       example_input=torch.zeros(case["shape"]), console=Console(stderr=True, quiet=True),
                       data=DataBundle(calibration=case["calib"], eval=case["eval"]), threads=THREADS)
    cfg = QuantizeConfig(backends=[], latency_iterations=1, samples=len(case["calib"]), debug_samples=2,
                         eval_samples=8, **overrides)
    ctx.artifacts.update(ExportStage().run(ctx, ExportConfig()).artifacts)  # as `- export: {}` before quantize
    return Path(QuantizeStage().run(ctx, cfg).artifacts["onnx_int8"].path)


def by_hand_int8(case: dict, work: Path) -> Path:
    import warnings

    from onnxruntime.quantization import quantize_static

    from pipeline.quantization.calibration import StreamingReader

    raw = work / "raw.onnx"
    warnings.simplefilter("ignore")
    torch.onnx.export(copy.deepcopy(case["model"]), (torch.zeros(case["shape"]),), str(raw), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "n"}, "output": {0: "n"}})
    out = work / "by_hand_int8.onnx"
    quantize_static(str(raw), str(out), StreamingReader(case["calib"], "input"))
    return out


def nncf_runner(case: dict) -> tuple[dict[str, Any], Any]:
    """NNCF's default INT8 (OpenVINO model, same calibration images, same OpenVINO settings as fmap)."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return {"variant": "NNCF INT8", "backend": "openvino", "note": "nncf not installed (pip install nncf)"}, None
    ov_model = ov.convert_model(copy.deepcopy(case["model"]), example_input=torch.zeros(case["shape"]))
    data = nncf.Dataset([x.numpy() for x, _ in case["calib"].batches(1)])
    q = nncf.quantize(ov_model, data)
    compiled = ov.Core().compile_model(q, "CPU", {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY",
                                                  "NUM_STREAMS": 1})
    req = compiled.create_infer_request()

    def infer(x):
        req.infer({0: x})
        return np.array(req.get_output_tensor(0).data)

    row = {"variant": "NNCF INT8", "backend": "openvino",
           **scores(lambda x: np.concatenate([infer(x[i:i + 1]) for i in range(len(x))]), case["model"], case["eval"])}
    return row, infer


def run_case(name: str, quick: bool, variants: bool, bn_recal: bool = False) -> list[dict[str, Any]]:
    from benchmarks.common import time_interleaved
    from pipeline.backends import onnxruntime as ort_b
    from pipeline.backends import openvino as ov_b
    from pipeline.export.onnx import export_onnx

    calib_n, eval_n = (16, 32) if quick else (64, 256)
    warmup, iters = (3, 20) if quick else (20, 200)
    case = load_case(name, calib_n, eval_n, bn_recal)
    torch.set_num_threads(THREADS)
    x1 = np.ascontiguousarray(case["eval"].first_batch(1)[0].numpy(), dtype=np.float32)
    rows: list[dict[str, Any]] = []
    runners: dict[int, Any] = {}
    sessions = []
    with tempfile.TemporaryDirectory(prefix=f"fmap-bench-{name}-") as tmp:
        work = Path(tmp)

        def torch_infer(x):
            with torch.no_grad():
                return case["model"](torch.from_numpy(x)).numpy()

        rows.append({"variant": "torch eager FP32", "backend": "torch", **scores(torch_infer, case["model"], case["eval"])})
        runners[0] = torch_infer
        if name != "digits_cnn":
            rows.append(noise_floor_row(case))
        fp32 = export_onnx(case["model"], torch.from_numpy(x1), work / "fp32.onnx")
        files = [("ORT FP32", fp32, "fp32", [ort_b]), ("OpenVINO FP32", fp32, "fp32", [ov_b]),
                 ("ORT INT8 by hand (quantize_static defaults)", by_hand_int8(case, work), "int8", [ort_b])]
        chosen = FMAP_VARIANTS if variants else dict(list(FMAP_VARIANTS.items())[:1])
        for i, (label, overrides) in enumerate(chosen.items()):
            files.append((label, fmap_int8(case, work / f"v{i}", overrides), "int8", [ort_b, ov_b]))
        for label, path, precision, backends in files:
            for b in backends:
                sess = b.load(path, threads=THREADS, precision_hint=precision)
                row = {"variant": label, "backend": sess.backend, **scores(sess.infer, case["model"], case["eval"])}
                if sess.backend == "openvino":
                    row["note"] = "exec " + ",".join(f"{k}:{v}" for k, v in sess.describe()["execution_precision"].items())
                rows.append(row)
                runners[len(rows) - 1] = sess.infer
                sessions.append(sess)
        nncf, nncf_infer = nncf_runner(case)
        rows.append(nncf)
        if nncf_infer is not None:
            runners[len(rows) - 1] = nncf_infer
        timed, _ = time_interleaved({str(k): (lambda f=f: f(x1)) for k, f in runners.items()}, 1, warmup, iters)
        for k, summary in timed.items():
            rows[int(k)]["latency_ms"] = summary["p50_ms"]
            rows[int(k)]["ci95_ms"] = summary["ci95_ms"]
        for sess in sessions:
            sess.close()
    for r in rows:
        r["model"] = name
    return rows


def fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.2f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | variant | backend | p50 ms [95% CI] | agreement vs torch | accuracy | FP32 classes seen | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = r.get("ci95_ms")
        lat = fmt(r.get("latency_ms")) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        lines.append(f"| {r['model']} | {r['variant']} | {r['backend']} | {lat} | "
                     f"{fmt(r.get('agreement'), True)} | {fmt(r.get('accuracy'), True)} | {r.get('classes', '-')} | "
                     f"{r.get('note', '')} |")
    return lines


def write_results(rows: list[dict[str, Any]], load: str) -> None:
    from benchmarks.common import machine_line, write_section
    from benchmarks.images import describe

    section = "\n".join([
        SECTION, "",
        f"{machine_line(THREADS)} `python benchmarks/quantize.py {' '.join(sys.argv[1:])}`; load average before the run: "
        f"{load}. torchvision models have random weights: agreement is top-1 agreement with torch FP32 on crops of "
        f"real photos ({describe()}) after centring the classifier bias so predictions depend on the input "
        "(`FP32 classes seen` shows they do); BatchNorm statistics are left as initialised (re-estimating them "
        "makes the random nets chaotic, see the script's docstring). The `noise floor` row is FP32 under one grey "
        "level of input noise. A proxy, not ImageNet accuracy. digits_cnn is trained and scored on its real "
        "test split. Latencies are interleaved round-robin, p50 with a bootstrap 95% CI.", "", *table(rows)])
    write_section(section, SECTION)


def main() -> int:
    import logging
    import os

    logging.getLogger().setLevel(logging.ERROR)  # ORT's "consider pre-processing" advice, wanted here
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="resnet18 + digits_cnn, few samples and iterations")
    ap.add_argument("--variants", action="store_true", help="also the fmap accuracy options and S8S8")
    ap.add_argument("--bn-recal", action="store_true", help="re-estimate BatchNorm statistics on the photos")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = ap.parse_args()
    models = args.models or (["resnet18", "digits_cnn"] if args.quick else ["resnet18", "mobilenet_v2", "digits_cnn"])
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows: list[dict[str, Any]] = []
    for name in models:
        print(f"[quantize bench] {name}", file=sys.stderr)
        rows.extend(run_case(name, args.quick, args.variants, args.bn_recal))
    print("\n".join(table(rows)))
    if args.write:
        write_results(rows, load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
