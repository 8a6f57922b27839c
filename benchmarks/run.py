"""Side by side, in one run on this machine: torch eager, ORT FP32, by-hand baselines, NNCF, and fmap.

For each model (ResNet-18 and MobileNetV2 from torchvision, random weights unless --weights-dir
has `<name>.pth`; fmap's builtin digits CNN, trained, with its real test split), every variant is
fed the same inputs and timed in the same harness, round-robin interleaved, 2 threads:

  torch eager FP32                      the reference
  ORT FP32                              torch.onnx export, onnxruntime
  by hand: TP L1 50% + ORT INT8         torch-pruning MagnitudeImportance(p=1) to 50% MACs (bisected
                                        channel ratio), quantize_static with its defaults (QDQ)
  by hand: TP L1 50% + NNCF INT8        the same pruned model, openvino.convert_model + nncf.quantize
  NNCF INT8 (unpruned)                  nncf.quantize of the original, run by OpenVINO
  fmap INT8 @ onnxruntime / @ openvino  `fmap run` on a generated recipe (profile -> activation prune
                                        50% MACs -> fine-tune (builtin only) -> export -> INT8 with
                                        fallback); its onnx_int8 artifact timed here

Accuracy: builtin = top-1 on the real test split. torchvision = top-1 agreement with torch FP32 on
the bundled real photos (benchmarks/images.py) plus logit cosine similarity and SQNR, because
random weights have no accuracy to hold; their BatchNorm statistics are set from the calibration
photos (recalibrate_bn) and the classifier bias is centred (benchmarks/quantize.py's center_logits)
so activations have a realistic scale and predictions depend on the input. Peak RSS: VmHWM of a fresh process that
imports the runtime, loads the artifact and runs 3 batches of 8 (the runtime's own import included;
the delta over the import alone is shown too). Liveness: pipeline.profiling.summarize on the torch
graph the variant comes from (FP32 activations, batch 1).

    .venv/bin/python benchmarks/run.py --quick                 # smoke run: small sets, few iterations
    .venv/bin/python benchmarks/run.py --write                 # the full table into RESULTS.md (make bench)
    .venv/bin/python benchmarks/run.py --models digits resnet18
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (RESULTS, file_size, fmt_mb, fmt_ms, machine_line, peak_rss_fresh,  # noqa: E402
                               speedup_ci, time_interleaved, write_section)

SECTION = "## Side-by-side (benchmarks/run.py)"
THREADS = 2
MODELS = ("resnet18", "mobilenet_v2", "digits")
BASELINE = "torch eager FP32"
NOPRUNE = "fmap INT8, quantize only (no prune)"


@dataclass
class Settings:
    quick: bool
    calib: int
    eval: int
    warmup: int
    iters: dict[int, int]
    weights_dir: Path | None = None

    @classmethod
    def make(cls, quick: bool, weights_dir: Path | None) -> Settings:
        if quick:
            return cls(quick, calib=16, eval=32, warmup=2, iters={1: 10, 8: 5}, weights_dir=weights_dir)
        return cls(quick, calib=64, eval=192, warmup=10, iters={1: 200, 8: 60}, weights_dir=weights_dir)


@dataclass
class Case:
    """One model with its data: what every variant of it is built from and scored on."""

    name: str
    source: str  # fmap model spec
    model: torch.nn.Module
    shape: list[int]  # NCHW, batch 1
    calib: Any  # TensorSplit
    eval: Any  # TensorSplit (labels only for builtin)
    train: Any | None = None
    weights_loaded: bool = False  # torchvision: real weights from --weights-dir


@dataclass
class Variant:
    name: str
    backend: str  # torch | onnxruntime | openvino
    files: list[Path]
    liveness_bytes: int | None
    infer: Callable[[np.ndarray], np.ndarray] | None = None
    wall_s: float | None = None  # time to produce the artifact (pipeline wall time for fmap)
    note: str = ""
    results: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Cases


def load_case(name: str, s: Settings) -> Case:
    from pipeline.sources.data import TensorSplit

    torch.manual_seed(0)
    if name == "digits":
        from pipeline.sources.builtin import digits_splits, pretrained_digits_cnn

        sp = digits_splits()
        (xc, yc), (xt, yt), (xtr, ytr) = sp["calibration"], sp["test"], sp["train"]
        n_eval = len(xt) if not s.quick else s.eval * 4
        return Case(name, "builtin:digits_cnn", pretrained_digits_cnn().eval(), [1, 1, 32, 32],
                    TensorSplit("calibration", xc, yc, batch_size=32),
                    TensorSplit("test", xt[:n_eval], yt[:n_eval], batch_size=64, num_classes=10),
                    TensorSplit("train", xtr, ytr, batch_size=64, num_classes=10))
    import torchvision

    from benchmarks.images import bundled_images
    from benchmarks.quantize import center_logits

    model = torchvision.models.get_model(name, weights=None).eval()
    calib = TensorSplit("calibration", bundled_images(s.calib, seed=1), None, batch_size=16)
    weights = (s.weights_dir / f"{name}.pth") if s.weights_dir else None
    if weights is not None and weights.is_file():
        from pipeline.sources.models import load_weights

        model = load_weights(model, str(weights)).eval()
    else:
        recalibrate_bn(model, calib)  # random weights: give activations a trained network's scale
        center_logits(model, calib)  # and make the predictions depend on the input
    return Case(name, f"torchvision:{name}", model, [1, 3, 224, 224], calib,
                TensorSplit("eval", bundled_images(s.eval, seed=0), None, batch_size=16),
                weights_loaded=weights is not None and weights.is_file())


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, calib: Any) -> None:
    """Set BatchNorm running statistics from the calibration images (a cumulative average).

    torchvision's random init leaves running_mean=0, running_var=1, so in eval mode activations
    shrink or grow layer by layer: random MobileNetV2's logits have std ~1e-9, pure float noise, on
    which no INT8 comparison means anything. With data-derived BN statistics every layer sees
    normalised activations, as in a trained network; the weights stay random.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for x, _ in calib.batches(16):
        model(x)
    model.eval()
    for bn in bns:
        bn.momentum = 0.1


def profile(model: torch.nn.Module, shape: list[int]) -> dict[str, Any]:
    """{macs, params, liveness_peak_bytes} at batch 1, or {} where the tracer cannot follow the graph."""
    try:
        from pipeline.profiling import summarize

        return summarize(model, torch.zeros(shape))
    except Exception:  # leave the cells empty rather than fail the benchmark
        return {}


# ------------------------------------------------------------------------------------------------
# By-hand baselines


def tp_l1_prune(model: torch.nn.Module, shape: list[int], amount: float = 0.5) -> tuple[torch.nn.Module, float]:
    """torch-pruning L1 magnitude pruning, channel ratio bisected until MACs fall by `amount` (+-2%)."""
    import torch_pruning as tp

    x = torch.zeros(shape)
    base_macs, _ = tp.utils.count_ops_and_params(model, x)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]

    def prune(ratio: float) -> tuple[torch.nn.Module, float]:
        m = copy.deepcopy(model)
        head_m = dict(m.named_modules())[next(n for n, mm in model.named_modules() if mm is head)]
        tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                             ignored_layers=[head_m]).step()
        macs, _ = tp.utils.count_ops_and_params(m, x)
        return m, 1 - macs / base_macs

    lo, hi = 0.0, 0.9
    best = prune(0.3)
    for _ in range(8):
        if abs(best[1] - amount) <= 0.02:
            break
        ratio = (lo + hi) / 2
        best = prune(ratio)
        lo, hi = (ratio, hi) if best[1] < amount else (lo, ratio)
    return best[0].eval(), best[1]


def export(model: torch.nn.Module, shape: list[int], path: Path) -> Path:
    """Plain torch.onnx export with a dynamic batch axis (what a user does by hand)."""
    torch.onnx.export(copy.deepcopy(model).eval(), (torch.zeros(shape),), str(path), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "n"}, "output": {0: "n"}})
    return path


def ort_int8_defaults(fp32: Path, calib: Any, out: Path) -> Path:
    from onnxruntime.quantization import quantize_static

    from pipeline.quantization.calibration import StreamingReader

    quantize_static(str(fp32), str(out), StreamingReader(calib, "input"))
    return out


def nncf_int8(model: torch.nn.Module, shape: list[int], calib: Any, out: Path) -> Path:
    """openvino.convert_model + nncf.quantize (defaults: performance preset), saved as IR."""
    import nncf
    import openvino as ov

    ov_model = ov.convert_model(copy.deepcopy(model).eval(), example_input=torch.zeros(shape),
                                input=[ov.PartialShape([-1, *shape[1:]])])
    data = nncf.Dataset([x.numpy() for x, _ in calib.batches(1)])
    ov.save_model(nncf.quantize(ov_model, data, subset_size=len(calib)), str(out))
    return out


# ------------------------------------------------------------------------------------------------
# fmap


def fmap_recipe(case: Case, work: Path, s: Settings, prune: bool = True) -> str:
    """The recipe `fmap run` gets: what a user of fmap would write for this model.

    prune=False: export + quantize only (recipes/mobilenet_v2-int8.yaml's pipeline), the
    like-for-like comparison with NNCF on the unpruned model."""
    if case.name == "digits":
        data = ("  calibration: {source: builtin, split: calibration, batch_size: 32}\n"
                "  eval: {source: builtin, split: test, batch_size: 64}\n"
                "  train: {source: builtin, split: train, batch_size: 64}\n")
        finetune = "      finetune: {epochs: 8, lr: 0.01, optimizer: sgd, distill: true}\n"
        fallback = "{max_accuracy_drop: 0.005}"
        weights = ""
    else:
        np.savez(work / "calib.npz", x=case.calib.x.numpy())
        np.savez(work / "eval.npz", x=case.eval.x.numpy())
        torch.save(case.model.state_dict(), work / "base.pt")
        data = (f"  calibration: {{source: numpy, path: {work / 'calib.npz'}, batch_size: 16}}\n"
                f"  eval: {{source: numpy, path: {work / 'eval.npz'}, batch_size: 16}}\n")
        finetune = "      round_to: 8\n"  # SIMD-friendly widths (no fine-tune: no labelled data)
        # at most 2 fallback steps: on random weights the target is rarely reachable (see RESULTS.md),
        # and each step re-quantizes and re-scores the whole model
        fallback = "{min_agreement: 0.98, max_steps: 2}"
        weights = f"  weights: {work / 'base.pt'}\n"
    head = (f"name: bench-{case.name}\nseed: 0\nthreads: {THREADS}\n"
            f"model:\n  source: {case.source}\n{weights}  input_shape: {case.shape}\n"
            f"data:\n{data}"
            "stages:\n")
    if prune:
        head += ("  - profile: {rank: false, plots: false}\n"
                 "  - prune:\n      criterion: activation\n      target: macs\n      amount: 0.5\n"
                 f"{finetune}")
    return (head + "  - export: {}\n"
            f"  - quantize: {{mode: static, calibration: minmax, backends: [], fallback: {fallback}}}\n")


def run_fmap(case: Case, work: Path, s: Settings, prune: bool = True) -> tuple[dict[str, Any], float, Path]:
    """`fmap run` as a subprocess (its memory stays out of this process); (manifest, wall s, run dir)."""
    tag = "" if prune else "-noprune"
    recipe = work / f"recipe{tag}.yaml"
    recipe.write_text(fmap_recipe(case, work, s, prune))
    run_dir = work / f"run{tag}"
    fmap = Path(sys.executable).parent / "fmap"
    cmd = [str(fmap)] if fmap.exists() else [sys.executable, "-c", "from pipeline.cli import main; main()"]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, "run", str(recipe), "--out", str(run_dir), "--json"],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise RuntimeError(f"fmap run failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}")
    manifest = json.loads(manifest_path.read_text())
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"fmap run exit {proc.returncode}: {manifest.get('error')}")
    return manifest, wall, run_dir


def fmap_artifacts(manifest: dict[str, Any], run_dir: Path) -> dict[str, Path]:
    return {name: run_dir / a["path"] for st in manifest["stages"] for name, a in (st.get("artifacts") or {}).items()}


# ------------------------------------------------------------------------------------------------
# Measuring


def torch_infer(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def infer(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    return infer


def load_session(backend: str, path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(infer, note): OpenVINO's note counts compute layers by the precision they really run in."""
    from pipeline.backends import onnxruntime as ort_b
    from pipeline.backends import openvino as ov_b

    mod = ort_b if backend == "onnxruntime" else ov_b
    sess = mod.load(path, threads=THREADS, precision_hint="int8" if "int8" in path.name else "fp32")
    note = ""
    if backend == "openvino":
        note = "runs " + " ".join(f"{k}:{v}" for k, v in sorted(sess.execution_precision().items()))
    return sess.infer, note


def score(v: Variant, case: Case, ref: np.ndarray) -> None:
    outs, correct = [], 0
    for x, y in case.eval.batches(8):
        out = v.infer(x.numpy())
        outs.append(out)
        if y is not None:
            correct += int((out.argmax(1) == y.numpy()).sum())
    out = np.concatenate(outs).astype(np.float64)
    r = ref.astype(np.float64)
    cos = (out * r).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(r, axis=1) + 1e-12)
    noise = ((out - r) ** 2).sum()
    v.results.update(agreement=float((out.argmax(1) == r.argmax(1)).mean()), cosine=float(cos.mean()),
                     sqnr_db=float(10 * np.log10((r ** 2).sum() / noise)) if noise > 0 else float("inf"),
                     accuracy=correct / len(out) if case.eval.has_labels else None)


def peak_rss(v: Variant, case: Case) -> None:
    found = peak_rss_fresh(v.backend, v.files[0], case.shape, case.source, threads=THREADS)
    if found:
        v.results.update(found)


# ------------------------------------------------------------------------------------------------
# One model


def run_case(name: str, s: Settings, log: Callable[[str], None]) -> tuple[list[Variant], dict[str, Any]]:
    torch.set_num_threads(THREADS)
    case = load_case(name, s)
    info: dict[str, Any] = {"model": name, "eval_samples": len(case.eval)}
    with tempfile.TemporaryDirectory(prefix=f"fmap-bench-{name}-") as tmp:
        work = Path(tmp)
        log(f"{name}: fmap run (profile -> prune -> export -> quantize)")
        manifest, wall, run_dir = run_fmap(case, work, s)
        arts = fmap_artifacts(manifest, run_dir)
        stages = {st["id"]: st for st in manifest["stages"]}
        info["fmap_stages_s"] = {k: round(st.get("duration_s") or 0, 1) for k, st in stages.items()}
        info["fmap_prune"] = {k: stages["prune"]["metrics"].get(k) for k in ("reduction", "accuracy", "ratio")}
        info["fmap_fallback"] = (stages.get("quantize", {}).get("metrics") or {}).get("fallback")
        from pipeline.sources.models import load_weights

        fmap_pruned = load_weights(copy.deepcopy(case.model), str(arts["pruned_checkpoint"]))

        log(f"{name}: by-hand baselines (torch-pruning L1, ORT quantize_static, NNCF)")
        t0 = time.perf_counter()
        tp_model, tp_red = tp_l1_prune(case.model, case.shape)
        t_tp = time.perf_counter() - t0
        info["tp_macs_reduction"] = round(tp_red, 4)
        base_onnx = export(case.model, case.shape, work / "base_fp32.onnx")
        tp_onnx = export(tp_model, case.shape, work / "tp_fp32.onnx")
        t0 = time.perf_counter()
        tp_ort = ort_int8_defaults(tp_onnx, case.calib, work / "tp_int8.onnx")
        t_ort = time.perf_counter() - t0
        t0 = time.perf_counter()
        tp_nncf = nncf_int8(tp_model, case.shape, case.calib, work / "tp_nncf_int8.xml")
        t_tp_nncf = time.perf_counter() - t0
        t0 = time.perf_counter()
        nncf_full = nncf_int8(case.model, case.shape, case.calib, work / "nncf_int8.xml")
        t_nncf = time.perf_counter() - t0
        torch.save(case.model.state_dict(), work / "base.pt")

        prof = {k: profile(m, case.shape) for k, m in (("base", case.model), ("tp", tp_model), ("fmap", fmap_pruned))}
        info["macs"] = {k: p.get("macs") for k, p in prof.items()}
        info["random_weights"] = case.source.startswith("torchvision") and not case.weights_loaded
        live_base, live_tp, live_fmap = (prof[k].get("liveness_peak_bytes") for k in ("base", "tp", "fmap"))
        ir = lambda p: [p, p.with_suffix(".bin")]  # noqa: E731
        variants = [
            Variant(BASELINE, "torch", [work / "base.pt"], live_base, torch_infer(case.model)),
            Variant("ORT FP32", "onnxruntime", [base_onnx], live_base),
            Variant("by hand: TP L1 50% + ORT INT8 (quantize_static defaults)", "onnxruntime", [tp_ort], live_tp,
                    wall_s=t_tp + t_ort, note=f"MACs -{tp_red:.0%}"),
            Variant("by hand: TP L1 50% + NNCF INT8", "openvino", ir(tp_nncf), live_tp, wall_s=t_tp + t_tp_nncf,
                    note=f"MACs -{tp_red:.0%}"),
            Variant("NNCF INT8 (unpruned)", "openvino", ir(nncf_full), live_base, wall_s=t_nncf),
        ]
        red = (info["fmap_prune"]["reduction"] or {}).get("macs")
        for backend in ("onnxruntime", "openvino"):
            variants.append(Variant("fmap INT8", backend, [arts["onnx_int8"]], live_fmap, wall_s=wall,
                                    note=f"MACs -{red:.0%}" if red is not None else ""))
        if case.source.startswith("torchvision"):
            log(f"{name}: fmap run, quantize only (export -> quantize)")
            manifest_q, wall_q, run_q = run_fmap(case, work, s, prune=False)
            info["fmap_noprune_fallback"] = next(st["metrics"].get("fallback") for st in manifest_q["stages"]
                                                 if st["id"] == "quantize")
            for backend in ("onnxruntime", "openvino"):
                variants.append(Variant(NOPRUNE, backend, [fmap_artifacts(manifest_q, run_q)["onnx_int8"]],
                                        live_base, wall_s=wall_q))
        for v in variants:
            if v.infer is None:
                v.infer, note = load_session(v.backend, v.files[0])
                v.note = "; ".join(n for n in (v.note, note) if n)

        log(f"{name}: accuracy / agreement on {len(case.eval)} samples")
        ref = np.concatenate([variants[0].infer(x.numpy()) for x, _ in case.eval.batches(8)])
        for v in variants:
            score(v, case, ref)

        first = next(case.eval.batches(8))[0].numpy()
        for bs in (1, 8):
            x = np.ascontiguousarray(first[:bs])
            log(f"{name}: latency bs={bs} ({s.iters[bs]} interleaved rounds)")
            runners = {f"{v.name}@{v.backend}": (lambda v=v: v.infer(x)) for v in variants}
            summary, raw = time_interleaved(runners, bs, s.warmup, s.iters[bs])
            base_key = f"{BASELINE}@torch"
            for v in variants:
                key = f"{v.name}@{v.backend}"
                ratio, ci = speedup_ci(raw[base_key], raw[key])
                v.results[f"bs{bs}"] = summary[key]
                v.results[f"speedup_bs{bs}"] = (ratio, ci)

        log(f"{name}: peak RSS (fresh process per variant)")
        for v in variants:
            v.results["size_bytes"] = file_size(*v.files)
            v.infer = None  # release sessions before the workers start
            peak_rss(v, case)
    return variants, info


# ------------------------------------------------------------------------------------------------
# Report


def table(name: str, variants: list[Variant], info: dict[str, Any]) -> list[str]:
    labelled = variants[0].results.get("accuracy") is not None
    quality = "top-1 accuracy (test)" if labelled else "top-1 agreement / cosine / SQNR dB vs FP32"
    lines = [f"### {name}", "",
             f"| variant | backend | p50 ms bs=1 [95% CI] | speedup bs=1 | p50 ms bs=8 [95% CI] | speedup bs=8 | "
             f"{quality} | size MB | liveness peak MB | peak RSS MB (Δ over import) | wall s | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        r = v.results
        sp = lambda k: f"{r[k][0]:.1f}x [{r[k][1][0]:.1f}, {r[k][1][1]:.1f}]" if k in r else "-"  # noqa: E731
        if labelled:
            q = f"{100 * r['accuracy']:.2f}%"
        else:
            q = f"{100 * r['agreement']:.1f}% / {r['cosine']:.3f} / {r['sqnr_db']:.1f}"
        rss = "-"
        if r.get("peak_rss_bytes"):
            delta = r["peak_rss_bytes"] - (r.get("import_rss_bytes") or 0)
            rss = f"{fmt_mb(r['peak_rss_bytes'])} ({fmt_mb(delta)})"
        lines.append(f"| {v.name} | {v.backend} | {fmt_ms(r.get('bs1'))} | {sp('speedup_bs1')} | "
                     f"{fmt_ms(r.get('bs8'))} | {sp('speedup_bs8')} | {q} | {fmt_mb(r.get('size_bytes'))} | "
                     f"{fmt_mb(v.liveness_bytes)} | {rss} | "
                     f"{'-' if v.wall_s is None else f'{v.wall_s:.1f}'} | {v.note} |")
    stages = ", ".join(f"{k} {v}s" for k, v in info["fmap_stages_s"].items())
    acc = info["fmap_prune"].get("accuracy")
    lines += ["", f"fmap stages: {stages}. fmap prune: {json.dumps(info['fmap_prune'].get('reduction'))}"
              + (f", accuracy {json.dumps(acc)}" if acc and any(v is not None for v in acc.values()) else "") + f"; by-hand TP MACs reduction "
              f"{info['tp_macs_reduction']:.1%}. Quantize fallback: "
              f"{_fallback(info.get('fmap_fallback'))}"
              + (f"; quantize-only run: {_fallback(info['fmap_noprune_fallback'])}" if "fmap_noprune_fallback" in info
                 else "") + ".", ""]
    return lines


def _fallback(fb: dict[str, Any] | None) -> str:
    fb = fb or {}
    return (f"target met: {fb.get('met')}, steps {len(fb.get('steps') or [])}, "
            f"float layers {fb.get('float_layers') or 'none'}")


def int8_peak_gmacs() -> float | None:
    """Upper bound on INT8 GMAC/s for THREADS threads with AVX-512 VNNI: 2 FMA ports x 64 int8
    MACs (vpdpbusd, 512-bit) per cycle per core at the nominal clock; None if the CPU lacks VNNI.
    AMX (Sapphire Rapids and later) is 8x that, which is why timings from such a machine differ."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    import re

    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
    if "avx512_vnni" not in text or not mhz:
        return None
    per_cycle = 128 * (8 if "amx_int8" in text else 1)
    return THREADS * per_cycle * float(mhz.group(1)) / 1e3


def goals(all_rows: dict[str, list[Variant]], infos: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's goals, checked against the measured rows (each line says met / NOT met and why)."""
    def get(rows: list[Variant], name: str) -> Variant | None:
        return next((v for v in rows if v.name == name), None)

    def best_fmap(rows: list[Variant], name: str = "fmap INT8") -> Variant:
        return min((v for v in rows if v.name == name), key=lambda v: v.results["bs1"]["p50_ms"])

    def quality(v: Variant) -> float:
        return v.results["accuracy"] if v.results.get("accuracy") is not None else v.results["agreement"]

    out = []
    if "resnet18" in all_rows:
        f = best_fmap(all_rows["resnet18"])
        sp, ms = f.results["speedup_bs1"][0], f.results["bs1"]["p50_ms"]
        line = (f"- ResNet-18: fmap ({f.backend}) {ms:.2f} ms, {sp:.1f}x vs torch eager (goal >= 25x, <= 1.0 ms): "
                f"{'met' if sp >= 25 and ms <= 1.0 else 'NOT met'}; agreement {quality(f):.1%}.")
        macs, peak = infos["resnet18"]["macs"].get("fmap"), int8_peak_gmacs()
        if macs:
            line += (f" The pruned model has {macs / 1e9:.2f} GMACs: {ms:.2f} ms is {macs / 1e6 / ms:.0f} GMAC/s; "
                     f"1.0 ms needs {macs / 1e6:.0f} GMAC/s")
            line += (f", while {THREADS} threads of this CPU peak at ~{peak:.0f} INT8 GMAC/s (AVX-512 VNNI, no AMX, "
                     "nominal clock)." if peak else ".")
        out.append(line)
    if "digits" in all_rows:
        rows = all_rows["digits"]
        f = best_fmap(rows)
        drop = rows[0].results["accuracy"] - f.results["accuracy"]
        sp = f.results["speedup_bs1"][0]
        out.append(f"- builtin digits: fmap ({f.backend}) accuracy drop {100 * drop:.2f} points at {sp:.1f}x "
                   f"(goal <= 0.5 point at >= 5x): {'met' if drop <= 0.005 and sp >= 5 else 'NOT met'}.")
    if "mobilenet_v2" in all_rows:
        rows = all_rows["mobilenet_v2"]
        f, n = best_fmap(rows, NOPRUNE), get(rows, "NNCF INT8 (unpruned)")
        ok = f.results["agreement"] >= 0.98 and n and f.results["bs1"]["p50_ms"] <= n.results["bs1"]["p50_ms"]
        out.append(f"- MobileNetV2 INT8 (quantize only, both unpruned): fmap ({f.backend}) agreement {f.results['agreement']:.1%} at "
                   f"{f.results['bs1']['p50_ms']:.2f} ms vs NNCF+OpenVINO (unpruned) "
                   f"{n.results['bs1']['p50_ms'] if n else float('nan'):.2f} ms, {n.results['agreement'] if n else 0:.1%} "
                   f"(goal >= 98% at <= NNCF's latency): {'met' if ok else 'NOT met'}.")
    for model, rows in all_rows.items():
        f = best_fmap(rows)
        beaten = [v for v in rows if v.name.startswith("by hand")
                  and (v.results["bs1"]["p50_ms"] < f.results["bs1"]["p50_ms"] or quality(v) > quality(f))]
        line = (f"- {model}: fmap ahead of every by-hand baseline (bs=1 speed at equal or better quality): "
                + ("met." if not beaten else "NOT met: " + "; ".join(
                    f"{v.name} @{v.backend} {v.results['bs1']['p50_ms']:.2f} ms, quality {quality(v):.1%}"
                    for v in beaten) + f" (fmap {f.results['bs1']['p50_ms']:.2f} ms, {quality(f):.1%})."))
        if infos[model].get("random_weights"):
            line += (" Random weights: every 50%-pruned variant (fmap's and by hand) loses most top-1 agreement "
                     "with the unpruned model, since nothing can be fine-tuned back without labelled data; "
                     "compare their quality on real weights (--weights-dir) or on the builtin model.")
        out.append(line)
    return out


def render(all_rows: dict[str, list[Variant]], infos: dict[str, dict[str, Any]], cmd: str, wall: float) -> str:
    from benchmarks.images import describe

    load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [SECTION, "", f"`{cmd}` (total {wall / 60:.1f} min; load average at the end {load}: on a shared "
             "machine other processes inflate absolute times, interleaving keeps the ratios fair)", "",
             machine_line(THREADS), "",
             "Same inputs for every variant; latency is the median of round-robin interleaved calls (one call of "
             "every variant per round) with a bootstrap 95% CI; speedup is vs torch eager FP32 with a paired "
             "bootstrap CI. Torchvision models have random weights (BatchNorm statistics set from the calibration photos "
             "and the classifier bias centred, so activations have a trained network's scale and predictions "
             "depend on the input): their quality column is top-1 agreement with "
             "torch FP32 on the bundled real photos (" + describe() + "; crops, flips, scales), plus mean logit "
             "cosine similarity and SQNR (dB). Random-weight agreement is a weak signal (pruning random filters "
             "cannot be fine-tuned back without data); cosine/SQNR show how far the outputs moved. Pruned variants "
             "are compared with the *unpruned* FP32 model, so their agreement includes the pruning error. The "
             "builtin digits model is trained and scored on its real test split. Size: file(s) on disk. Liveness "
             "peak: FP32 activations of the variant's torch graph at batch 1 (pipeline.profiling). Peak RSS: "
             "VmHWM (peak RSS) of a fresh process that imports the runtime, loads the artifact and runs 3 "
             "batches of 8; in brackets the part above the runtime import alone. "
             "Wall s: time to produce the artifact (fmap: the whole `fmap run`, including profile and the "
             "quantize fallback's evaluation).", ""]
    for name, rows in all_rows.items():
        lines += table(name, rows, infos[name])
    lines += ["Goals:", "", *goals(all_rows, infos), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small image sets, few iterations")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--weights-dir", type=Path, help="local <model>.pth state_dicts (torchvision models)")
    ap.add_argument("--write", action="store_true", help=f"replace '{SECTION}' in benchmarks/RESULTS.md")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    s = Settings.make(args.quick, args.weights_dir)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[bench {time.perf_counter() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    all_rows, infos = {}, {}
    for name in args.models:
        all_rows[name], infos[name] = run_case(name, s, log)
        print("\n".join(table(name, all_rows[name], infos[name])), file=sys.stderr, flush=True)  # partial results
    cmd = "python " + " ".join(["benchmarks/run.py", *sys.argv[1:]])
    section = render(all_rows, infos, cmd, time.perf_counter() - t0)
    print(section)
    if args.write:
        write_section(section, SECTION, RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
