"""Many no-grad forwards at once, through onnxruntime: the targets distillation trains against.

Head distillation needs the original's logits and the student's chain output on thousands of
images, and computing them was most of its time: on 2 cores, EfficientNet-Lite0's FP32 forward
at batch 64 costs 60 ms an image in torch (channels-last; 94 ms in the default layout) and 10 ms
in onnxruntime on an AMD EPYC (benchmarks/RESULTS.md, "Targets through onnxruntime"); 39 ms and
7 ms on an Intel Xeon. So the model is
exported once, in memory, with every tapped module's output as an extra graph output, and the
images run through an InferenceSession.

Nothing here may change what is computed, only how fast: the first 8 images also run in torch,
and any difference above float rounding (as any failure to export or load) sends the whole call to
torch instead, with the reason logged. Tapped modules must run once per forward and hand on one
tensor.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

CHECK_IMAGES = 8  # the first images run both ways; their outputs must agree
RTOL = 1e-3  # of the output's largest magnitude: float rounding differs between the two, a wrong graph by far more


class _Tapped(nn.Module):
    """The model's logits plus the output of each tapped module, as one tuple (what ONNX exports).
    Always in eval mode, and the model with it: the exporter hands back what it exported in the mode
    it found it in, so a wrapper left in train mode would put the model's BatchNorm in train mode."""

    def __init__(self, model: nn.Module, taps: Sequence[nn.Module]) -> None:
        super().__init__()
        self.model, self.taps = model, list(taps)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from pipeline.pruning.validation import _tensor

        got: dict[int, Any] = {}
        hooks = [m.register_forward_hook(lambda _m, _a, out, i=i: got.setdefault(i, out))
                 for i, m in enumerate(self.taps)]
        try:
            out = _tensor(self.model(x))
        finally:
            for h in hooks:
                h.remove()
        if len(got) != len(self.taps):
            raise RuntimeError("a tapped module did not run")
        for value in got.values():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"expected a tensor at the tap, got {type(value).__name__}")
        return (out, *(got[i].float() for i in range(len(self.taps))))


@torch.no_grad()
def forward_all(model: nn.Module, images: torch.Tensor, taps: Sequence[nn.Module] = (), batch_size: int = 64,
                log: Callable[[str], None] = lambda s: None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`model`'s eval-mode output on every image (logits; a block's output for a block), and each
    tapped module's output; through onnxruntime when it reproduces torch on the first images, else
    in torch, saying why in `log`. The model's mode is restored."""
    from pipeline.pruning.blockwise import _channels_last

    was_training = model.training
    tapped = _Tapped(model, taps)
    try:
        try:
            run = _onnxruntime(tapped, images[:1])
            check = images[:CHECK_IMAGES]
            _same(run(check), _torch(tapped, check))
        except Exception as exc:  # noqa: BLE001 - any failure means: compute it in torch
            reason = str(exc).splitlines()[0][:200] if str(exc) else ""
            log(f"onnxruntime not used ({type(exc).__name__}: {reason}); running in torch")
            with _channels_last(tapped, images) as layout:
                parts = [[t.contiguous() for t in tapped(layout(images[i:i + batch_size]))]
                         for i in range(0, len(images), batch_size)]
        else:
            parts = [run(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    outs = [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]
    return outs[0], outs[1:]


def _torch(tapped: _Tapped, x: torch.Tensor) -> list[torch.Tensor]:
    return list(tapped(x))


def _onnxruntime(tapped: _Tapped, example: torch.Tensor) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    import onnxruntime as ort

    names = [f"out{i}" for i in range(1 + len(tapped.taps))]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tapped, (example,), buf, input_names=["x"], output_names=names,
                          dynamic_axes={n: {0: "batch"} for n in ["x", *names]}, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in session.run(names, {"x": x.float().contiguous().numpy()})]

    return run


def _same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape:
            raise ValueError(f"shape {tuple(g.shape)} instead of {tuple(w.shape)}")
        limit = RTOL * float(w.abs().max()) + 1e-6
        diff = float((g - w).abs().max())
        if not diff <= limit:
            raise ValueError(f"outputs differ from torch by {diff:.3g} (allowed {limit:.3g})")
