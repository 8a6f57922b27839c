"""How much a compressed model still "looks" where the original did, per image.

Torch models: Grad-CAM agreement (Pearson correlation of CAMs; IoU of their top-20% regions).
ONNX artifacts: no gradients, so feature-map agreement at layers that map back to torch modules.
Per-channel spatial Pearson is used when channel counts match: it is invariant to the per-channel
affine transforms an exporter folds in (Conv+BatchNorm fusion), so FP32 ONNX scores ~1. When
channels differ (a pruned model), the channel-mean |activation| maps are compared instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-8


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image Pearson correlation of [N, ...] tensors. Two constant maps count as identical (1)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    r = (a * b).sum(1) / (na * nb).clamp_min(EPS)
    both_flat = (na < EPS) & (nb < EPS)
    return torch.where(both_flat, torch.ones_like(r), r).float()


def top_region_iou(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """Per-image IoU of the top-`fraction` pixels of two [N, H, W] maps."""
    a, b = a.flatten(1), b.flatten(1)
    k = max(1, int(round(fraction * a.shape[1])))
    ma = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    mb = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    return ((ma & mb).sum(1).float() / (ma | mb).sum(1).float()).float()


def featuremap_similarity(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-image agreement of two [N, C, H, W] activations of the same layer (see module doc)."""
    ref, other = ref.float(), other.float()
    if other.shape[-2:] != ref.shape[-2:]:
        other = F.interpolate(other, size=ref.shape[-2:], mode="bilinear", align_corners=False)
    if ref.shape[1] == other.shape[1]:
        n, c = ref.shape[:2]
        r = pearson(ref.reshape(n * c, -1), other.reshape(n * c, -1)).view(n, c)
        live = ref.reshape(n, c, -1).std(-1) > EPS  # channels that vary on this image
        return torch.where(live, r, torch.zeros_like(r)).sum(1) / live.sum(1).clamp_min(1)
    return pearson(ref.abs().mean(1), other.abs().mean(1))


def summarize(values: torch.Tensor | np.ndarray, worst: int = 5) -> dict[str, Any]:
    """Distribution of per-image similarities: mean, min, p10 and the indices of the worst images."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    return {"mean": float(v.mean()), "min": float(v.min()), "p10": float(np.percentile(v, 10)),
            "worst": [int(i) for i in order[:worst]]}


# ---- ONNX: expose intermediate tensors that map back to torch modules -------------------------

def module_path_of_node(node: Any) -> str | None:
    """The torch module path a node came from: TorchScript-exporter names ('/layer1/layer1.0/conv1/Conv')
    or the dynamo exporter's 'pkg.torch.onnx.name_scopes' metadata. None when it carries neither."""
    for prop in getattr(node, "metadata_props", []):
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",") if s.strip(" '\"")]
            return _join_scopes(scopes) if scopes else None
    if not node.name.startswith("/"):
        return None
    parts = [p for p in node.name.split("/")[1:-1] if p]
    return _join_scopes(parts) if parts else None


def _join_scopes(parts: list[str]) -> str:
    path = ""
    for p in parts:
        path = p if not path or p.startswith(path + ".") else f"{path}.{p}"
    return path


def onnx_layer_map(model_proto: Any, layers: list[str]) -> dict[str, str]:
    """{layer: ONNX tensor name} for layers found in the graph. A layer is a torch module path (its
    module's last node's output) or, for graphs without module scopes, a node's name (its output)."""
    found: dict[str, str] = {}
    wanted = set(layers)
    for node in model_proto.graph.node:  # topological order: the last match is the module's output
        if not node.output or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        path = module_path_of_node(node)
        if path in wanted:
            found[path] = node.output[0]
        if node.name in wanted:
            found[node.name] = node.output[0]
    return {layer: found[layer] for layer in layers if layer in found}


def onnx_activations(path: str | Path, x: np.ndarray, layers: list[str], threads: int = 2,
                     ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, str]]:
    """Run an ONNX file with the mapped tensors added as graph outputs: (logits, {layer: act}, map)."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    mapping = onnx_layer_map(proto, layers)
    existing = {o.name for o in proto.graph.output}
    for tensor in mapping.values():
        if tensor not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
            existing.add(tensor)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else 32
    names = [sess.get_outputs()[0].name] + list(mapping.values())
    chunks = [sess.run(names, {inp.name: x[i:i + fixed].astype(np.float32)}) for i in range(0, len(x), fixed)]
    outs = [np.concatenate([c[j] for c in chunks]) for j in range(len(names))]
    acts = {layer: outs[1 + list(mapping.values()).index(t)].astype(np.float32) for layer, t in mapping.items()}
    return outs[0].astype(np.float32), acts, mapping
