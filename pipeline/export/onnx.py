"""Torch -> ONNX export that quantizers and every backend can consume, plus its equivalence check.

Uses the TorchScript exporter (`dynamo=False`): in torch 2.14 it still exports torchvision CNNs in
seconds with named nodes (`/layer1/layer1.0/conv1/Conv`) that `exclude:` lists can refer to, while
the dynamo exporter is slower and renames nodes. The graph is then post-processed so every Conv/Gemm
owns its weight and bias initializers (see `make_initializers_distinct`), checked with
`onnx.checker.check_model(full_check=True)` and shape-inferred.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.atomic import atomic_path, temp_prefix
from pipeline.errors import BadInput, StageFailed

if TYPE_CHECKING:  # torch is imported where used, so `fmap validate` never pays for it
    import torch

DEFAULT_OPSET = 17  # every backend here (ORT 1.32, OpenVINO 2026, TensorRT 10) handles 17 well
INPUT_NAME, OUTPUT_NAME = "input", "output"
_PROTO_LIMIT = 2**31 - 1  # protobuf's hard limit; larger models need external data
_WEIGHT_OPS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,)}


def export_onnx(model: torch.nn.Module, example_input: torch.Tensor, path: str | Path, *,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, simplify: bool = True,
                constant_folding: bool = True) -> Path:
    """Export `model` to `path` (written atomically) and return the path.

    The model is exported in eval mode on CPU from a deep copy, so the caller's module (possibly on
    a GPU or in train mode) is left untouched.
    """
    import onnx
    import torch

    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()
    x = example_input.detach().cpu().float()
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    path.parent.mkdir(parents=True, exist_ok=True)
    # per-process name: two writers never share it, and a killed run's leftover is recognisable
    tmp_dir = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".export", dir=path.parent))
    raw = tmp_dir / "raw.onnx"
    try:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice is expected
            torch.onnx.export(model, (x,), str(raw), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=dynamic_axes, do_constant_folding=constant_folding)
        proto = onnx.load(str(raw))  # also pulls in external data written beside it
    except Exception as exc:  # torch raises many types here; the message is what matters
        raise StageFailed(f"ONNX export of {type(model).__name__} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    if simplify:
        proto = _simplify(proto)
    make_initializers_distinct(proto)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True) if proto.ByteSize() < _PROTO_LIMIT else proto
    except Exception:  # shape inference is an aid, not a requirement
        pass
    save_onnx(proto, path)
    check_onnx(path)
    return path


def _simplify(proto: Any) -> Any:
    """onnxslim: constant folding + dead-node and Identity elimination; keep the input on failure."""
    import onnxslim

    try:
        slim = onnxslim.slim(proto)
    except Exception:  # a simplifier bug must not fail an otherwise valid export
        return proto
    return slim if slim is not None else proto


def make_initializers_distinct(proto: Any) -> int:
    """Give every Conv/Gemm/MatMul its own weight and bias initializer; return how many were copied.

    The torch exporter deduplicates identical initializers: a torchvision model with untrained BN
    folds to all-zero conv biases that end up shared (or routed through Identity nodes). ORT's
    quantizer then refuses those biases ("Expected bias ... to be an initializer") and leaves the
    conv in float, so the INT8 model runs slower than FP32. Copying fixes that for a few KB.
    """
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    identity_src = {n.output[0]: n.input[0] for n in graph.node
                    if n.op_type == "Identity" and n.input[0] in inits}
    uses: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            uses[name] = uses.get(name, 0) + 1
    taken: set[str] = set()
    copied = 0
    for node in graph.node:
        for idx in _WEIGHT_OPS.get(node.op_type, ()):
            if idx >= len(node.input) or not node.input[idx]:
                continue
            name = node.input[idx]
            src = identity_src.get(name, name)
            if src not in inits:
                continue
            if name == src and uses.get(name, 0) == 1 and name not in taken:
                taken.add(name)
                continue
            new_name = f"{node.name or node.op_type}.{'weight' if idx == 1 else 'bias'}_{copied}"
            arr = numpy_helper.to_array(inits[src])
            graph.initializer.append(numpy_helper.from_array(arr.copy(), new_name))
            node.input[idx] = new_name
            taken.add(new_name)
            copied += 1
    if copied:
        _drop_unused(proto)
    return copied


def _drop_unused(proto: Any) -> None:
    """Remove Identity nodes and initializers nothing reads any more."""
    graph = proto.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Identity" and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def save_onnx(proto: Any, path: str | Path) -> Path:
    """Save atomically; models over 2 GB go to external data (`<name>.data` beside the file)."""
    import onnx

    path = Path(path)
    big = proto.ByteSize() >= _PROTO_LIMIT if _can_size(proto) else True
    with atomic_path(path) as tmp:
        if big:
            data_name = path.name + ".data"
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(proto, str(tmp))
    return path


def _can_size(proto: Any) -> bool:
    try:
        proto.ByteSize()
        return True
    except Exception:  # protobuf raises past 2 GB on some builds
        return False


def check_onnx(path: str | Path) -> None:
    """Run the full ONNX checker (with shape inference); a failure is a runtime StageFailed."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise StageFailed(f"exported ONNX {path} fails onnx.checker: {exc}") from exc


def load_onnx(path: str | Path) -> Any:
    """Load an ONNX file given by the user; a missing or corrupt file is BadInput naming the path."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto if proto.ByteSize() < _PROTO_LIMIT else str(path))
    except Exception as exc:
        raise BadInput(f"not a valid ONNX model: {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    return proto


@dataclass
class Equivalence:
    """Polygraphy-style comparison result: an element fails only if it exceeds atol AND rtol."""

    max_abs_diff: float
    max_rel_diff: float
    mean_abs_diff: float
    mismatched: int
    elements: int
    nan: int
    samples: int
    atol: float
    rtol: float

    @property
    def passed(self) -> bool:
        return self.mismatched == 0 and self.nan == 0 and self.elements > 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def compare_outputs(reference: np.ndarray, actual: np.ndarray, atol: float, rtol: float) -> Equivalence:
    """Compare one batch; NaN/inf in `actual` where `reference` is finite always fails."""
    ref = reference.astype(np.float64)
    act = actual.astype(np.float64)
    if ref.shape != act.shape:
        raise StageFailed(f"ONNX output shape {act.shape} differs from torch output shape {ref.shape}")
    bad_nan = int(np.count_nonzero(~np.isfinite(act) & np.isfinite(ref)))
    diff = np.abs(ref - act)
    diff = np.where(np.isfinite(diff), diff, np.inf)
    rel = diff / np.maximum(np.abs(ref), np.finfo(np.float64).tiny)
    fails = (diff > atol) & (rel > rtol)
    finite = np.isfinite(diff)
    return Equivalence(
        max_abs_diff=float(diff[finite].max()) if finite.any() else float("inf"),
        max_rel_diff=float(rel[finite].max()) if finite.any() else float("inf"),
        mean_abs_diff=float(diff[finite].mean()) if finite.any() else float("inf"),
        mismatched=int(np.count_nonzero(fails)), elements=int(diff.size), nan=bad_nan,
        samples=int(ref.shape[0]) if ref.ndim else 1, atol=atol, rtol=rtol)


def merge(a: Equivalence | None, b: Equivalence) -> Equivalence:
    if a is None:
        return b
    n = a.elements + b.elements
    return Equivalence(
        max_abs_diff=max(a.max_abs_diff, b.max_abs_diff), max_rel_diff=max(a.max_rel_diff, b.max_rel_diff),
        mean_abs_diff=(a.mean_abs_diff * a.elements + b.mean_abs_diff * b.elements) / max(n, 1),
        mismatched=a.mismatched + b.mismatched, elements=n, nan=a.nan + b.nan,
        samples=a.samples + b.samples, atol=a.atol, rtol=a.rtol)


def check_equivalence(onnx_path: str | Path, model: torch.nn.Module, inputs: Iterable[torch.Tensor], *,
                      atol: float = 1e-4, rtol: float = 1e-3, threads: int = 2,
                      max_samples: int | None = 64) -> Equivalence:
    """Run torch and ONNX Runtime (FP32, CPU) on the same inputs and compare the outputs.

    `inputs` is streamed batch by batch, so real calibration data can be used without holding it.
    The caller decides what a failure means (the export stage raises StageFailed).
    """
    import torch

    from pipeline.backends import onnxruntime as ort_backend

    model = copy.deepcopy(model).cpu().eval()
    result: Equivalence | None = None
    seen = 0
    with ort_backend.load(onnx_path, threads=threads) as session:
        for x in inputs:
            if max_samples is not None and seen >= max_samples:
                break
            if max_samples is not None:
                x = x[: max_samples - seen]
            x = x.detach().cpu().float()
            with torch.no_grad():
                ref = model(x)
            ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
            result = merge(result, compare_outputs(ref, session.infer(x.numpy()), atol, rtol))
            seen += int(x.shape[0])
    if result is None:
        raise StageFailed("equivalence check got no input batches")
    return result
