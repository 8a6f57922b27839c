"""INT8 quality on a real pretrained network: EfficientNet-Lite0 (ImageNet weights) on real photos.

Every variant is judged against torch FP32 on the same crops of photos that calibration never saw
(`pipeline.sources.photos`: calibration crops come from one half of the bundled photos, evaluation
crops from the other half):
- agreement: top-1 decisions identical to FP32, on all crops and on the confident subset (FP32
  top-1 probability >= 0.5), where near-ties cannot dominate;
- SQNR of the logits against FP32 (dB), which ties do not affect at all;
- the noise floor: FP32 under Gaussian input noise of one 8-bit grey level, measured in the same run;
- whether the artifact can saturate int16 on x86 CPUs without VNNI (pipeline.quantization.saturation),
  so one run on any x86 CPU covers the other kind too;
- latency at batch 1, all variants interleaved in one run (only ratios within the run mean anything).

    python benchmarks/int8_pretrained.py --write        # ~10 min on 2 cores; needs .[models,bench]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

THREADS = 2
HEADING = "## INT8 on a pretrained model (EfficientNet-Lite0, real photos)"


def quality(out: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Agreement (all, confident subset) and logits' SQNR of `out` against the FP32 `ref` logits."""
    probs = torch.from_numpy(ref).softmax(1).numpy()
    confident = probs.max(1) >= 0.5
    same = out.argmax(1) == ref.argmax(1)
    err = float(((out.astype(np.float64) - ref) ** 2).sum())
    sqnr = 10 * np.log10(float((ref.astype(np.float64) ** 2).sum()) / err) if err > 0 else float("inf")
    return {"agreement": float(same.mean()), "confident": float(same[confident].mean()) if confident.any() else None,
            "confident_n": int(confident.sum()), "sqnr_db": float(sqnr)}


def run_all(infer: Callable[[np.ndarray], np.ndarray], x: torch.Tensor, batch: int = 16) -> np.ndarray:
    return np.concatenate([infer(np.ascontiguousarray(x[i:i + batch].numpy())) for i in range(0, len(x), batch)])


def fmap_int8(model: torch.nn.Module, calib, eval_split, work: Path, **overrides: Any) -> tuple[Path, dict]:
    from rich.console import Console

    from pipeline.sources.data import DataBundle
    from pipeline.stages.base import StageContext
    from pipeline.stages.export import ExportConfig, ExportStage
    from pipeline.stages.quantize import QuantizeConfig, QuantizeStage

    ctx = StageContext(run_dir=work, model=model, original_model=model,
                       example_input=calib.x[:1], console=Console(stderr=True, quiet=True),
                       data=DataBundle(calibration=calib, eval=eval_split), threads=THREADS)
    cfg = QuantizeConfig(backends=[], latency_iterations=1, samples=len(calib), debug_samples=4,
                         eval_samples=len(eval_split), **overrides)
    ctx.artifacts.update(ExportStage().run(ctx, ExportConfig()).artifacts)  # as `- export: {}` before quantize
    result = QuantizeStage().run(ctx, cfg)
    return Path(result.artifacts["onnx_int8"].path), result.metrics


def by_hand_int8(fp32: Path, calib, work: Path) -> Path:
    """onnxruntime's quantize_static with its defaults (QDQ, S8S8, per-tensor), as a user would."""
    from onnxruntime.quantization import quantize_static

    from pipeline.export.onnx import INPUT_NAME
    from pipeline.quantization.calibration import StreamingReader

    out = work / "by_hand_int8.onnx"
    quantize_static(str(fp32), str(out), StreamingReader(calib, INPUT_NAME))
    return out


def nncf_models(model: torch.nn.Module, calib) -> dict[str, Any]:
    """NNCF INT8 for OpenVINO: default and fast_bias_correction=False (same calibration crops)."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return {}
    ov_model = ov.convert_model(copy.deepcopy(model), example_input=calib.x[:1])
    data = nncf.Dataset([calib.x[i:i + 1].numpy() for i in range(len(calib))])
    return {"NNCF default": nncf.quantize(ov_model, data, subset_size=len(calib)),
            "NNCF fast_bias_correction=False": nncf.quantize(ov_model, data, subset_size=len(calib),
                                                             fast_bias_correction=False)}


def ov_infer(ov_model: Any) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": THREADS,
                                                         "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
    req = compiled.create_infer_request()

    def infer(x: np.ndarray) -> np.ndarray:
        return np.concatenate([np.array(req.infer({0: x[i:i + 1]})[compiled.output(0)]) for i in range(len(x))])

    return infer


def saturation_note(path: Path, ranges: dict[str, Any]) -> str:
    from pipeline.quantization import saturation

    risky = saturation.at_risk(saturation.check(path, ranges))
    return "safe on every x86" if not risky else f"{len(risky)} layers can saturate without VNNI"


def main(argv: list[str] | None = None) -> int:
    import logging

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--qat-steps", type=int, default=200, help="fine-tune steps of the QAT row (0: no QAT row)")
    ap.add_argument("--ablations", action="store_true", help="also rows without bias correction and with equalization")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="keep only the fmap rows whose label contains TEXT (repeatable)")
    ap.add_argument("--heading", default=HEADING, help="the RESULTS.md section to (re)write")
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    from benchmarks.common import machine_line, time_interleaved, write_section
    from benchmarks.pretrained import GREY_LEVEL
    from pipeline.backends import onnxruntime as ort_b
    from pipeline.backends import openvino as ov_b
    from pipeline.export.onnx import export_onnx
    from pipeline.quantization.targets import host_cpu
    from pipeline.sources import photos
    from pipeline.sources.data import TensorSplit
    from pipeline.sources.pretrained import LITE_MEAN, LITE_STD, efficientnet_lite0

    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    model = efficientnet_lite0()
    norm = {"mean": LITE_MEAN, "std": LITE_STD}  # Lite0 was trained on [-1, 1] pixels
    calib = TensorSplit("calibration", photos.photo_split("calibration", args.calib, **norm), None, batch_size=16)
    evals = TensorSplit("test", photos.photo_split("test", args.eval, **norm), None, batch_size=16)
    with torch.no_grad():
        ref = torch.cat([model(evals.x[i:i + 16]) for i in range(0, len(evals), 16)]).numpy()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        noisy = torch.cat([model(evals.x[i:i + 16] + GREY_LEVEL * torch.randn(evals.x[i:i + 16].shape, generator=g))
                           for i in range(0, len(evals), 16)]).numpy()
    rows: list[dict[str, Any]] = [{"variant": "noise floor: FP32 + 1 grey level input noise", "backend": "torch",
                                   **quality(noisy, ref)}]
    runners: dict[int, Callable[[np.ndarray], Any]] = {}
    x1 = np.ascontiguousarray(evals.x[:1].numpy())

    def add(label: str, backend: str, infer: Callable[[np.ndarray], np.ndarray], note: str = "") -> None:
        print(f"scoring {label} on {backend}", file=sys.stderr, flush=True)
        rows.append({"variant": label, "backend": backend, "note": note, **quality(run_all(infer, evals.x), ref)})
        runners[len(rows) - 1] = infer

    def torch_infer(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    add("FP32", "torch", torch_infer)
    with tempfile.TemporaryDirectory(prefix="fmap-int8-pretrained-") as tmp:
        work = Path(tmp)
        fp32 = export_onnx(model, evals.x[:1], work / "fp32.onnx")
        prep = work / "prep.onnx"
        from pipeline.quantization.ort_quant import preprocess

        preprocess(fp32, prep)
        from pipeline.export.onnx import INPUT_NAME
        from pipeline.quantization.calibration import StreamingReader
        from pipeline.quantization.saturation import activation_ranges

        ranges = activation_ranges(prep, StreamingReader(calib, INPUT_NAME))  # one pass serves every file
        files = [("FP32", fp32, "fp32"), ("quantize_static by hand (ORT defaults)", by_hand_int8(fp32, calib, work), "int8")]
        host = host_cpu().target
        best = {"calibration": "mse", "weight_rounding": "gptq"}
        variants = {f"fmap PTQ minmax (target auto = {host})": {},
                    f"fmap PTQ mse range search (target auto = {host})": {"calibration": "mse"},
                    f"fmap PTQ gptq rounding (target auto = {host})": {"weight_rounding": "gptq"},
                    f"fmap PTQ mse + gptq (target auto = {host})": best,
                    "fmap PTQ mse + gptq (target x86-avx2: safe on every x86)": {**best, "target": "x86-avx2"}}
        if args.ablations:  # each algorithm's measured effect, against the row above it in the table
            variants[f"fmap PTQ mse + gptq, bias correction off (target auto = {host})"] = {**best, "bias_correction": False}
            variants[f"fmap PTQ mse + gptq + equalization (target auto = {host})"] = {**best, "equalization": True}
        if args.qat_steps:
            variants[f"fmap QAT mse, {args.qat_steps} steps (target auto = {host})"] = {
                "calibration": "mse", "method": "qat", "qat": {"steps": args.qat_steps}}
        if args.only:
            variants = {k: v for k, v in variants.items() if any(t in k for t in args.only)}
        notes: dict[str, str] = {}
        for i, (label, overrides) in enumerate(variants.items()):
            print(f"quantizing: {label}", file=sys.stderr, flush=True)
            path, metrics = fmap_int8(model, calib, evals, work / f"fmap{i}", **overrides)
            files.append((label, path, "int8"))
            if "qat" in metrics:
                q = metrics["qat"]
                notes[label] = (f"QAT {'kept' if q['kept'] else 'not kept (PTQ scored higher)'}: held-out KL "
                                f"{q['candidate_zero']['kl']:.4f} -> {q['best']['kl']:.4f} in {q['steps_run']} steps "
                                f"({q['seconds']:.0f} s); {q['placement']['activations']} activations and "
                                f"{q['placement']['weights']} weights simulated, "
                                f"{len(q['placement']['unmatched_activations'])} unmatched")
        sessions = []
        for label, path, precision in files:
            note = saturation_note(path, ranges) if precision == "int8" else ""
            note = "; ".join(n for n in (note, notes.get(label, "")) if n)
            for b in (ort_b, ov_b):
                sess = b.load(path, threads=THREADS, precision_hint=precision)
                sessions.append(sess)
                add(label, sess.backend, sess.infer, note)
        for label, q in nncf_models(model, calib).items():
            add(label, "openvino", ov_infer(q))
        print("timing (interleaved)", file=sys.stderr, flush=True)
        timed, _ = time_interleaved({str(k): (lambda f=f: f(x1)) for k, f in runners.items()}, 1, 5, args.iterations)
        for k, summary in timed.items():
            rows[int(k)]["p50_ms"] = summary["p50_ms"]
        for sess in sessions:
            sess.close()
    load = os.getloadavg()[0]
    lines = table(rows)
    print("\n".join(lines))
    if args.write:
        cpu = host_cpu()
        section = [args.heading, "",
                   f"`python benchmarks/int8_pretrained.py --calib {args.calib} --eval {args.eval} "
                   f"--qat-steps {args.qat_steps}{' --ablations' if args.ablations else ''}"
                   f"{''.join(f' --only {t!r}' for t in args.only)}"
                   f"{f' --heading {args.heading!r}' if args.heading != HEADING else ''} --write`; "
                   f"{machine_line(THREADS)} CPU int8 flags: {', '.join(cpu.flags)} (fmap target `{cpu.target}`); "
                   f"load average {load:.1f} during the run.", "",
                   f"Calibration: {args.calib} crops of {photos.describe('calibration')}; evaluation: {args.eval} "
                   f"crops of {photos.describe('test')} (no photo in both), scaled to [-1, 1] as Lite0 was trained. Agreement = top-1 identical to torch "
                   "FP32; confident = crops where FP32's top-1 probability is >= 0.5; SQNR = logits vs FP32.", "",
                   *lines]
        write_section("\n".join(section), args.heading)
    return 0


def table(rows: list[dict[str, Any]]) -> list[str]:
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    out = ["| variant | backend | agreement | confident (n) | logits SQNR | p50 bs1 | int16 (AVX2) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        p50 = f"{r['p50_ms']:.2f} ms" if r.get("p50_ms") is not None else "-"
        out.append(f"| {r['variant']} | {r['backend']} | {pct(r['agreement'])} | {pct(r['confident'])} "
                   f"({r['confident_n']}) | {r['sqnr_db']:.1f} dB | {p50} | {r.get('note') or ''} |")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
