"""Error-compensating weight rounding (GPTQ: Frantar et al., 2022, after Optimal Brain Quantization)
on the QDQ ONNX file: round a layer's weights one input position at a time and push each rounding
error onto the weights not yet rounded, weighted by the inverse Hessian of the layer's output
error on calibration data, instead of rounding every weight to nearest on its own.

Why: round-to-nearest minimises each weight's own error, not the layer's output error; on
depthwise-separable networks weight rounding, not activation ranges, limits INT8 quality (see
docs/stages/quantize.md). Per layer (per group for grouped and depthwise convs), with float input
patches X sampled from the calibration data, H = X^T X / P + damping, and the QDQ file's
per-channel scales s (never changed):

    for k in input positions:  q_k = clip(round(w_k / s)),  e = (w_k - s q_k) / Hinv[k, k],
                               w_{k+1:} -= e * Hinv[k, k+1:]      (Hinv: upper Cholesky factor)

Patches make a conv a matrix product, so this is cheap on a CPU and needs no training loop. The
result is kept only where it lowers the layer's output error on the patches (never worse than
nearest); the bias absorbs the mean output shift of the new codes, so bias correction stays
consistent. Layers are independent and cached by name, so the fallback's re-quantizations reuse
them. (AdaRound's learned rounding was tried first: with a few hundred Adam steps on a CPU it did
not move away from nearest rounding on our test layers.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DAMPING = 0.01  # of the mean Hessian diagonal, as in GPTQ


@dataclass
class RoundingResult:
    codes: np.ndarray  # int8 codes in the QDQ weight's layout
    bias_shift: np.ndarray | None  # float shift per output channel to add to the bias
    mse_nearest: float
    mse_learned: float


def apply(qdq_path: Path, float_path: Path, reader: Any, cache: dict[str, RoundingResult], *,
          patches: int = 4096, reference: str = "nearest") -> dict[str, Any]:
    """Round every quantized Conv/Gemm of `qdq_path` not yet in `cache`, then write
    every cached result into the file. `reference` is the weights the current bias was matched to
    ("nearest" after bias correction, "float" without). Returns per-layer output MSE before/after."""
    import onnx

    from pipeline.quantization.graph import index, set_initializer

    model = onnx.load(str(qdq_path))
    layers = _layers(model, float_path)
    missing = [layer for layer in layers if layer["name"] not in cache]
    if missing:
        samples = _patches(float_path, missing, reader, patches)
        for layer in missing:
            cache[layer["name"]] = _round(layer, samples[layer["name"]], reference)
    inits, producer, _ = index(model.graph)
    report = {}
    for layer in layers:
        res = cache[layer["name"]]
        set_initializer(model.graph, layer["codes_name"], res.codes.astype(np.int8))
        if res.bias_shift is not None and layer["bias_codes"] is not None:
            b_scale = layer["bias_scale"]
            bias = layer["bias_codes"].astype(np.float64) * b_scale + res.bias_shift
            set_initializer(model.graph, layer["bias_codes_name"], np.round(bias / b_scale).astype(np.int32))
        report[layer["name"]] = {"mse_nearest": _r(res.mse_nearest), "mse_gptq": _r(res.mse_learned)}
    onnx.save(model, str(qdq_path))
    return report


def _r(v: float) -> float:
    return float(f"{v:.4g}")


def _layers(model: Any, float_path: Path) -> list[dict[str, Any]]:
    """Quantized Conv/Gemm layers with float weights available, as plain arrays and attributes."""
    import onnx
    from onnx import numpy_helper

    from pipeline.quantization.graph import attr, index, qdq_matrix_layers

    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(float_path)).graph.initializer}
    inits, producer, _ = index(model.graph)
    out = []
    for node, a_q, w_dq in qdq_matrix_layers(model.graph, ("Conv", "Gemm")):
        codes_name = w_dq.input[0]
        w_float = floats.get(codes_name.removesuffix("_quantized"))
        if w_float is None:
            continue
        if node.op_type == "Gemm" and not attr(node, "transB", 0):
            continue  # weights stored [K, N]: rare in CNN heads; left at nearest rounding
        layer = {"name": node.name, "op": node.op_type, "act": a_q.input[0], "codes_name": codes_name,
                 "codes": numpy_helper.to_array(inits[codes_name]), "w": w_float.astype(np.float32),
                 "scale": numpy_helper.to_array(inits[w_dq.input[1]]).astype(np.float32),
                 "group": int(attr(node, "group", 1)), "bias_codes": None, "bias_codes_name": None,
                 "bias_scale": None}
        if node.op_type == "Conv":
            kernel = list(layer["w"].shape[2:])
            layer.update(kernel=kernel, strides=list(attr(node, "strides", [1] * len(kernel))),
                         pads=list(attr(node, "pads", [0] * 2 * len(kernel))),
                         dilations=list(attr(node, "dilations", [1] * len(kernel))))
            if len(kernel) != 2:
                continue
        if len(node.input) > 2 and producer.get(node.input[2]) is not None:
            b_dq = producer[node.input[2]]
            if b_dq.op_type == "DequantizeLinear" and b_dq.input[0] in inits:
                layer.update(bias_codes=numpy_helper.to_array(inits[b_dq.input[0]]), bias_codes_name=b_dq.input[0],
                             bias_scale=numpy_helper.to_array(inits[b_dq.input[1]]).astype(np.float64))
        out.append(layer)
    return out


def _patches(float_path: Path, layers: list[dict[str, Any]], reader: Any, per_layer: int) -> dict[str, Any]:
    """Random input patches of each layer, [P, groups, K] float32, from one pass over `reader`."""
    import onnx
    import torch

    from pipeline.quantization.graph import tensor_batches

    names = sorted({layer["act"] for layer in layers})
    batches = max(1, -(-reader.samples_available() // reader.batch_size))
    take = max(1, per_layer // batches)
    rng = np.random.default_rng(0)
    got: dict[str, list[np.ndarray]] = {layer["name"]: [] for layer in layers}
    for arrays in tensor_batches(onnx.load(str(float_path)), names, reader):
        for layer in layers:
            x = torch.from_numpy(np.asarray(arrays[layer["act"]], dtype=np.float32))
            cols = _unfold(x, layer)  # [N * L, groups, K]
            idx = rng.choice(cols.shape[0], size=min(take, cols.shape[0]), replace=False)
            got[layer["name"]].append(cols[idx].numpy())
    return {k: np.concatenate(v) for k, v in got.items() if v}


def _unfold(x: Any, layer: dict[str, Any]) -> Any:
    """Conv input -> patch rows [N*L, groups, Cin/groups*kh*kw]; Gemm input -> [N, 1, K]."""
    import torch.nn.functional as F

    if layer["op"] == "Gemm":
        return x.reshape(x.shape[0], 1, -1)
    top, left, bottom, right = layer["pads"]
    x = F.pad(x, (left, right, top, bottom))
    cols = F.unfold(x, layer["kernel"], dilation=layer["dilations"], stride=layer["strides"])  # [N, C*k, L]
    n, ck, positions = cols.shape
    return cols.permute(0, 2, 1).reshape(n * positions, layer["group"], ck // layer["group"])


def _round(layer: dict[str, Any], x: np.ndarray, reference: str) -> RoundingResult:
    import torch

    w = torch.from_numpy(layer["w"]).reshape(layer["w"].shape[0], -1).double()  # [Cout, K]
    scale = torch.from_numpy(np.broadcast_to(layer["scale"], (w.shape[0],)).copy()).double()[:, None]
    groups, k = layer["group"], w.shape[1]
    xs = torch.from_numpy(x).double()  # [P, G, K]
    nearest = torch.from_numpy(layer["codes"].reshape(w.shape[0], -1).astype(np.float64))
    lo, hi = min(float(nearest.min()), -1.0), max(float(nearest.max()), 1.0)  # keep the file's code range
    wg, sg = w.reshape(groups, -1, k).clone(), scale.reshape(groups, -1, 1)  # [G, O, K], [G, O, 1]
    hess = torch.einsum("pgk,pgl->gkl", xs, xs) / xs.shape[0]  # [G, K, K]
    diag = hess.diagonal(dim1=1, dim2=2)
    hess = hess + (DAMPING * diag.mean(1).clamp(min=1e-12))[:, None, None] * torch.eye(k, dtype=hess.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hess)), upper=True)
    codes = torch.empty_like(wg)
    for j in range(k):
        col = wg[:, :, j]
        q = torch.clamp(torch.round(col / sg[:, :, 0]), lo, hi)
        codes[:, :, j] = q
        err = (col - q * sg[:, :, 0]) / hinv[:, j, j][:, None]
        wg[:, :, j + 1:] -= err[:, :, None] * hinv[:, j, j + 1:][:, None, :]
    rounded = codes.reshape(w.shape[0], k)
    target = torch.einsum("pgk,gok->pgo", xs, w.reshape(groups, -1, k))

    def outputs(c: Any) -> Any:
        return torch.einsum("pgk,gok->pgo", xs, (scale * c).reshape(groups, -1, k))

    mse_near = float(((outputs(nearest) - target) ** 2).mean())
    mse_gptq = float(((outputs(rounded) - target) ** 2).mean())
    if mse_gptq >= mse_near:  # never worse than nearest on the patches
        rounded, mse_gptq = nearest, mse_near
    ref = outputs(nearest) if reference == "nearest" else target
    shift = (ref - outputs(rounded)).mean(0)
    out = rounded.reshape(layer["codes"].shape).numpy().astype(np.int8)
    return RoundingResult(out, shift.reshape(-1).numpy(), mse_near, mse_gptq)
