"""Grad-CAM and Grad-CAM++ in one backward pass, with hooks (own ~50 lines, no extra dependency).

Grad-CAM (Selvaraju et al. 2017): weights = spatial mean of d score / d A; CAM = ReLU(sum_c w_c A_c).
Grad-CAM++ (Chattopadhay et al. 2018, the closed form used by pytorch-grad-cam): pixel weights
alpha = g^2 / (2 g^2 + sum(ReLU(A)) g^3), w_c = sum(alpha * ReLU(g)). Both are upsampled to the input size
and scaled to [0, 1] per image, so CAMs from different models compare directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-7


@dataclass
class CamResult:
    gradcam: torch.Tensor  # [N, H, W] in [0, 1], input resolution
    gradcam_pp: torch.Tensor  # [N, H, W]
    logits: torch.Tensor  # [N, classes]
    targets: torch.Tensor  # [N] the class each CAM explains


def grad_cam(model: nn.Module, x: torch.Tensor, layer: str, targets: torch.Tensor | None = None) -> CamResult:
    """CAMs of `layer` for `targets` (default: each image's predicted class). Model mode is kept."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), record_with_grad(model, layer) as store:
            logits = model(x.detach().clone().requires_grad_(True))
            act = store["act"]
            if targets is None:
                targets = logits.argmax(1)
            score = logits.gather(1, targets.view(-1, 1).to(logits.device)).sum()
            (grads,) = torch.autograd.grad(score, act)
    finally:
        model.train(was_training)
    act, grads = act.detach().float(), grads.float()
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * act).sum(1))
    g2 = grads.pow(2)
    # The closed form assumes A >= 0 (a post-ReLU map); on a pre-ReLU conv output a negative sum(A)
    # flips alpha's sign, so the sum uses the positive part, i.e. what the following ReLU passes on.
    alpha = g2 / (2 * g2 + act.clamp_min(0).sum(dim=(2, 3), keepdim=True) * g2 * grads + EPS)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    w_pp = (alpha * F.relu(grads)).sum(dim=(2, 3), keepdim=True)
    cam_pp = F.relu((w_pp * act).sum(1))
    size = tuple(x.shape[-2:])
    return CamResult(_upsample_norm(cam, size), _upsample_norm(cam_pp, size), logits.detach(), targets.detach())


class record_with_grad:  # noqa: N801 - used like a function
    """Context manager: store the layer's output (attached to the graph) as store["act"]."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.module = dict(model.named_modules())[layer]
        self.store: dict[str, torch.Tensor] = {}

    def __enter__(self) -> dict[str, torch.Tensor]:
        def hook(_m: nn.Module, _i: object, o: torch.Tensor) -> None:
            self.store["act"] = o
        self.handle = self.module.register_forward_hook(hook)
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def _upsample_norm(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    cam = F.interpolate(cam.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    flat = cam.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(EPS)).view_as(cam)
