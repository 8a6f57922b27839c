"""Find what compression produced and measure, per image, how far its attention moved.

Candidates: the current model when it differs from the original (pruned), compared by Grad-CAM for the
original's predicted class; every ONNX artifact (FP32, INT8 QDQ), compared by feature maps at the
layers whose ONNX tensors map back to torch modules (see similarity.onnx_layer_map).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.contracts import Artifact
from pipeline.visualize import similarity as sim
from pipeline.visualize.featuremaps import conv_layers
from pipeline.visualize.gradcam import grad_cam


@dataclass
class Comparison:
    name: str
    method: str = ""  # "gradcam" or "featuremap"
    similarity: torch.Tensor | None = None  # [N]
    iou: torch.Tensor | None = None  # [N] top-20% IoU (gradcam only)
    probs: torch.Tensor | None = None  # [N, classes]
    ref_maps: torch.Tensor | None = None  # [N, H, W] what the original attends to (for pictures)
    maps: torch.Tensor | None = None  # [N, H, W] same for this artifact
    cams: torch.Tensor | None = None  # Grad-CAMs for the gallery (torch only)
    agreement: float | None = None  # fraction of images with the original's top-1
    layers: dict[str, str] = field(default_factory=dict)  # torch layer -> compared tensor
    skipped: str | None = None

    def summary(self) -> dict[str, Any]:
        assert self.similarity is not None
        out = sim.summarize(self.similarity) | {"method": self.method, "agreement": self.agreement, "layers": self.layers}
        if self.iou is not None:
            out["iou_top20_mean"] = float(self.iou.mean())
        return out


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def compare_all(model: nn.Module, artifacts: Mapping[str, Artifact], threads: int, ref: nn.Module,
                x: torch.Tensor, layers: list[str], ref_acts: dict[str, torch.Tensor],
                ref_logits: torch.Tensor) -> Iterator[Comparison]:
    """Yield one Comparison per compressed model: `model` when it differs from `ref` (pruned), and
    every model artifact (skipped ones carry the reason)."""
    targets = ref_logits.argmax(1)
    if model is not ref and not same_weights(model, ref):
        # Named like verify names it: the torch artifact that holds it (the prune checkpoint), else "pruned".
        name = next((n for n, a in artifacts.items() if a.kind == "torch"), "pruned")
        yield compare_torch(name, ref, model, x, layers[-1], targets)
    for name, art in artifacts.items():
        if art.kind == "onnx":
            try:
                yield compare_onnx(name, str(art.path), x, layers, ref_acts, targets, threads)
            except Exception as exc:  # best effort: an unreadable or exotic graph is a visible skip
                yield Comparison(name, skipped=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        elif art.is_model and art.kind != "torch":
            yield Comparison(name, skipped=f"{art.kind} artifacts cannot expose activations here")


def compare_torch(name: str, ref: nn.Module, other: nn.Module, x: torch.Tensor, layer: str,
                  targets: torch.Tensor) -> Comparison:
    """Grad-CAM agreement at `layer` (or the other model's deepest conv if renamed) for the same classes."""
    other_layers = dict(other.named_modules())
    other_layer = layer if layer in other_layers else (conv_layers(other) or [layer])[-1]
    a = grad_cam(ref, x, layer, targets)
    b = grad_cam(other, x, other_layer, targets)
    return Comparison(name, "gradcam", sim.pearson(a.gradcam, b.gradcam), sim.top_region_iou(a.gradcam, b.gradcam),
                      torch.softmax(b.logits.float(), 1), a.gradcam, b.gradcam, b.gradcam,
                      float((b.logits.argmax(1) == targets).float().mean()), {layer: other_layer})


def compare_onnx(name: str, path: str, x: torch.Tensor, layers: list[str], ref_acts: dict[str, torch.Tensor],
                 targets: torch.Tensor, threads: int) -> Comparison:
    """Feature-map agreement averaged over the layers found in the ONNX graph."""
    logits, acts, mapping = sim.onnx_activations(path, x.numpy(), layers, threads)
    probs = torch.softmax(torch.from_numpy(logits).float(), 1)
    agreement = float((probs.argmax(1) == targets).float().mean())
    if not mapping:
        return Comparison(name, skipped="no ONNX tensor maps back to the chosen layers", probs=probs, agreement=agreement)
    per_layer = [sim.featuremap_similarity(ref_acts[l], torch.from_numpy(acts[l])) for l in mapping]
    deepest = list(mapping)[-1]
    return Comparison(name, "featuremap", torch.stack(per_layer).mean(0), None, probs,
                      ref_acts[deepest].abs().mean(1), torch.from_numpy(acts[deepest]).abs().mean(1), None,
                      agreement, mapping)
