"""Head distillation: train the layers after the residual chain against the original's logits.

Block-wise distillation matches feature maps; what agreement counts is the top-1 decision, and on
unlabelled photos most decisions are near-ties between two classes (benchmarks/RESULTS.md: one
8-bit grey level of noise flips 14% of the original's own decisions on EfficientNet-Lite0's
crops). The layers after the chain (Lite0: a 1x1 conv, BatchNorm, pooling, the classifier) decide
those ties, so they are trained last with the decision's own loss, KL divergence to the
original's softmax, on the student's chain outputs. Those are computed once per image (the chain
is frozen), so each step costs only the head's forward and backward and the phase can use many
more images than block-wise distillation, which holds every block's feature maps in memory: on
Lite0 at -30% MACs, 4096 crops took agreement from 80.6% to 83.7% where the least-squares refit
on 128 crops gave 80.0%, and 1024 crops gave 81.6%.

The head is run as the model itself with the chain replaced by a module that hands back the
cached outputs, so any model whose layers after the chain depend only on the chain's output works;
that is checked on the first batch (the replaced model must reproduce the model's logits), and a
model that fails the check is left untouched with the reason. BatchNorm statistics stay in eval
mode, as in block-wise distillation.

Where the time goes: the targets (the original's logits, the student's chain outputs) are one
no-grad forward of each model per image, computed through onnxruntime (fast_inference: 5-6x
faster than torch on Lite0); and the replaced model is fed only an 8x8 corner of each image when
that reproduces its logits, because the layers before the chain still run and at full size they
were over half of a step (benchmarks/RESULTS.md, "Targets through onnxruntime"). On Lite0, 4096
images and 10 epochs went from about 7 minutes to about 2.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.pruning.blockwise import adam_cosine, captured, time_left
from pipeline.pruning.fast_inference import forward_all
from pipeline.pruning.validation import _tensor


@dataclass(frozen=True)
class HeadSettings:
    epochs: float = 5.0  # passes over the images
    lr: float = 3e-4  # Adam, cosine decay to zero
    batch_size: int = 64
    temperature: float = 1.0  # T=4 did worse on Lite0's near-ties (83.2% against 83.7%)
    seed: int = 0
    # wall-clock budget of the whole step, targets included (None: epochs only); training ends at
    # what is left of it or at its epochs, whichever comes first
    minutes: float | None = None


class _Pass(nn.Module):
    """Stands in for a block before the chain's last: hands its first argument on, at no cost."""

    def forward(self, x: Any, *_args: Any, **_kwargs: Any) -> Any:
        return x


class _Cached(nn.Module):
    """Stands in for the chain's last block: returns whatever `value` holds, whatever it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        assert self.value is not None
        return self.value


def chain_output(model: nn.Module, chain_name: str, images: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """What the chain's last block hands on for every image (the forward stops there)."""
    last = list(model.get_submodule(chain_name).children())[-1]
    return captured(model, last, images, chunk, output=True, channels_last=True)


def distill_head(student: nn.Module, teacher: nn.Module, chain_name: str, images: torch.Tensor,
                 settings: HeadSettings, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Train, in place, the parameters of `student` that run after `chain_name` to match `teacher`'s
    logits on `images` (KL divergence at `settings.temperature`); returns a report."""
    start = time.monotonic()
    if not len(images):
        return {"skipped": "no images"}
    student.eval()
    teacher.eval()
    params = _params_after(student, chain_name, images[:1])
    if not params:
        return {"skipped": f"no trainable layer runs after '{chain_name}'"}
    n = min(len(images), 8)
    last = list(student.get_submodule(chain_name).children())[-1]
    try:
        exact = chain_output(student, chain_name, images[:n])  # in torch: what the replay check holds to
        _, (features,) = forward_all(student, images, [last], log=lambda m: log(f"prune: head distillation: student {m}"))
    except TypeError as e:  # a chain that hands on a tuple or dict cannot be replayed
        return {"skipped": str(e)}
    target, _ = forward_all(teacher, images, log=lambda m: log(f"prune: head distillation: original {m}"))
    log(f"prune: head distillation: original's logits and the chain's outputs on {len(images)} images "
        f"({time.monotonic() - start:.0f} s)")
    with torch.no_grad():
        real = _tensor(student(images[:n]))
    with _chain_replaced(student, chain_name) as cached:
        cached.value = exact
        feed = _replay_input(student, images[:n], real)
        if feed is None:
            return {"skipped": f"the layers after '{chain_name}' use more than its output"}
        checked = time.monotonic()
        kl_before = _kl(student, cached, feed, images, features, target, settings)
        check_s = time.monotonic() - checked
        seconds = None if settings.minutes is None else time_left(settings.minutes * 60.0, start, check_s)
        initial = {id(p): p.detach().clone() for p in params}
        steps = max(1, int(settings.epochs * len(images) / settings.batch_size))
        T = settings.temperature

        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            cached.value = features[idx]
            out = _tensor(student(feed(images[idx])))
            return F.kl_div(F.log_softmax(out / T, 1), F.softmax(target[idx] / T, 1), reduction="batchmean") * T * T

        with torch.enable_grad():
            steps = adam_cosine(params, len(images), steps, settings.batch_size, settings.lr, settings.seed,
                                loss_of, lambda m: log(f"prune: head distillation: {m}"), seconds)
        kl_after = _kl(student, cached, feed, images, features, target, settings)
        status = "trained"
        if not kl_after < kl_before:
            with torch.no_grad():
                for p in params:
                    p.copy_(initial[id(p)])
            status = "reverted (training raised the KL divergence)"
    log(f"prune: head distillation: KL to the original {kl_before:.4f} -> {kl_after:.4f} "
        f"({steps} steps, {time.monotonic() - start:.0f} s){'' if status == 'trained' else '; ' + status}")
    return {"status": status, "images": len(images), "epochs": settings.epochs, "minutes": settings.minutes,
            "lr": settings.lr,
            "temperature": settings.temperature, "steps": steps, "kl_before": round(kl_before, 6),
            "kl_after": round(kl_after, 6) if math.isfinite(kl_after) else None,
            "seconds": round(time.monotonic() - start, 2)}


STAND_IN = 8  # side of the corner of each image fed to the replaced model


def _corner(x: torch.Tensor) -> torch.Tensor:
    return x[..., :STAND_IN, :STAND_IN] if x.dim() == 4 else x


@torch.no_grad()
def _replay_input(student: nn.Module, x: torch.Tensor, real: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model with its chain replaced is fed, checked against its real logits `real` on `x`:
    a small corner of each image when that reproduces them (the layers before the chain still run,
    and on Lite0 they were over half of a head step at full size), else the images themselves;
    None when neither does (the layers after the chain use more than its output)."""
    atol = 1e-4 * float(real.abs().max()) + 1e-6
    for feed in (_corner, lambda t: t):
        try:
            replayed = _tensor(student(feed(x)))
        except Exception:  # noqa: BLE001 - a model that needs its full input size: try the next feed
            if feed is _corner:
                continue
            raise
        if replayed.shape == real.shape and torch.allclose(replayed, real, rtol=1e-4, atol=atol):
            return feed
    return None


@torch.no_grad()
def _kl(student: nn.Module, cached: _Cached, feed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
        features: torch.Tensor, target: torch.Tensor, s: HeadSettings, sample: int = 512) -> float:
    """KL divergence to the original on (at most) the first `sample` images, at temperature 1."""
    total, n = 0.0, min(len(images), sample)
    for i in range(0, n, s.batch_size):
        cached.value = features[i:min(i + s.batch_size, n)]
        out = _tensor(student(feed(images[i:min(i + s.batch_size, n)])))
        total += float(F.kl_div(F.log_softmax(out, 1), F.softmax(target[i:i + len(out)], 1), reduction="sum"))
    return total / n


def _params_after(model: nn.Module, chain_name: str, example: torch.Tensor) -> list[nn.Parameter]:
    """Parameters of the modules whose forward starts after the chain's last block has finished."""
    last = list(model.get_submodule(chain_name).children())[-1]
    order: list[nn.Module] = []
    done = [False]

    def pre(m: nn.Module, _a: Any) -> None:
        if done[0]:
            order.append(m)

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules() if m is not model]
    hooks.append(last.register_forward_hook(lambda *_: done.__setitem__(0, True)))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    seen: set[int] = set()
    out = []
    for m in order:
        for p in m.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


@contextmanager
def _chain_replaced(model: nn.Module, chain_name: str) -> Iterator[_Cached]:
    """While open, the chain's blocks hand their input on and its last block returns the cached
    output (works for nn.Sequential and for a ModuleList the model loops over); put back on exit."""
    chain = model.get_submodule(chain_name)
    blocks = dict(chain.named_children())
    names = list(blocks)
    cached = _Cached()
    for name in names[:-1]:
        chain._modules[name] = _Pass()
    chain._modules[names[-1]] = cached
    try:
        yield cached
    finally:
        for name in names:
            chain._modules[name] = blocks[name]
