"""Quantization-aware fine-tuning: torch learns weights that survive the QDQ file's rounding.

The torch model is made to compute what the calibrated QDQ file computes (qat_placement): fixed
activation fake-quantization with the file's scales and zero points at the tensors it quantizes,
and per-channel symmetric weight fake-quantization recomputed from the current weights each step,
as onnxruntime's quantizer will recompute them. Gradients pass the rounding straight through.
BatchNorm statistics and every non-Conv/Linear parameter stay frozen (the file has BN folded into
the Conv weights), so only Conv/Linear weights and biases learn, and they are written back into
the *same* float ONNX file the QDQ file was made from, by the per-channel BN factor read off the
file itself. The caller then re-emits QDQ with the same calibration cache: same placement, same
activation scales, new weights; every runtime that read the PTQ file reads this one.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from pydantic import Field

from pipeline.contracts import StageConfig
from pipeline.errors import BadInput
from pipeline.pruning.augment import AugmentConfig
from pipeline.quantization.passes import QuantPass, QuantState, register
from pipeline.quantization.qat_placement import ActivationPoint, Placement


class _WeightFakeQuant(nn.Module):
    """Symmetric fake quantization of a weight, per channel along `axis` (or per tensor)."""

    def __init__(self, axis: int | None, qmax: int) -> None:
        super().__init__()
        self.axis, self.qmax = axis, qmax

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            scale = (w.detach().abs().max() / self.qmax).clamp_min(1e-12).reshape(1)
            return torch.fake_quantize_per_tensor_affine(w, scale, torch.zeros(1, dtype=torch.int32),
                                                         -self.qmax, self.qmax)
        dims = [d for d in range(w.dim()) if d != self.axis]
        scale = (w.detach().abs().amax(dim=dims) / self.qmax).clamp_min(1e-12)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, self.axis, -self.qmax, self.qmax)


class QatModel(nn.Module):
    """The float model with the QDQ file's fake quantization; `train()` keeps every layer in eval
    mode (frozen BatchNorm, no dropout), because the deployed graph has them folded or removed."""

    def __init__(self, model: nn.Module, placement: Placement) -> None:
        super().__init__()
        self.model = model.eval()
        self._calls: dict[str, int] = {}
        self._hooks: list[Any] = [model.register_forward_pre_hook(self._reset)]
        modules = dict(model.named_modules())
        by_module: dict[str, list[ActivationPoint]] = {}
        for p in placement.activations:
            by_module.setdefault(p.module, []).append(p)
        for name, points in by_module.items():
            mod = modules[name]
            self._hooks.append(mod.register_forward_pre_hook(self._pre_hook(name, points), prepend=True))
            self._hooks.append(mod.register_forward_hook(self._post_hook(name, points)))
        for w in placement.weights:
            parametrize.register_parametrization(modules[w.module], "weight", _WeightFakeQuant(w.axis, w.qmax))
        self.weights = placement.weights

    def train(self, mode: bool = True) -> QatModel:
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x)

    def _reset(self, _m: nn.Module, _args: tuple) -> None:
        self._calls.clear()

    def _pre_hook(self, name: str, points: list[ActivationPoint]):
        def hook(_m: nn.Module, args: tuple) -> tuple | None:
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            ins = [p for p in points if p.side == "input" and p.call == call]
            if not ins or not args or not isinstance(args[0], torch.Tensor):
                return None
            return (_fake_quant(args[0], ins[0]),) + tuple(args[1:])
        return hook

    def _post_hook(self, name: str, points: list[ActivationPoint]):
        def hook(_m: nn.Module, _args: tuple, out: Any) -> Any:
            call = self._calls.get(name, 1) - 1
            outs = [p for p in points if p.side == "output" and p.call == call]
            return _fake_quant(out, outs[0]) if outs and isinstance(out, torch.Tensor) else None
        return hook

    def release(self) -> nn.Module:
        """Remove hooks and fake quantization; the wrapped model keeps its trained float weights."""
        for h in self._hooks:
            h.remove()
        modules = dict(self.model.named_modules())
        for w in self.weights:
            parametrize.remove_parametrizations(modules[w.module], "weight", leave_parametrized=False)
        return self.model


def _fake_quant(x: torch.Tensor, p: ActivationPoint) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x, p.scale, p.zero_point, p.qmin, p.qmax)


def trainable_layers(model: nn.Module, float_onnx: Any) -> dict[str, tuple[str, str | None, np.ndarray, bool]]:
    """{module: (onnx weight, onnx bias or None, per-channel BN factor k, transposed)} for every
    Conv/Linear whose folded ONNX weight is exactly k * its torch weight per output channel: those
    can learn and be written back. Anything else stays frozen."""
    from onnx import numpy_helper

    from pipeline.profiling.onnx_graph import module_path

    inits = {t.name: t for t in float_onnx.graph.initializer}
    modules = dict(model.named_modules())
    out: dict[str, tuple[str, str | None, np.ndarray, bool]] = {}
    for node in float_onnx.graph.node:
        mod = modules.get(module_path(node.name))
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits \
                or not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        folded = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        w = mod.weight.detach().cpu().double().numpy()
        transposed = folded.shape != w.shape
        if transposed:
            if folded.T.shape != w.shape:
                continue
            folded = folded.T
        k = _channel_factors(w, folded)
        if k is not None:
            bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
            out[module_path(node.name)] = (node.input[1], bias, k, transposed)
    return out


def _channel_factors(w: np.ndarray, folded: np.ndarray) -> np.ndarray | None:
    """k with folded[c] == k[c] * w[c] for every output channel c (least squares, then verified).
    An all-zero channel gets k = NaN: its BN factor is unknowable, so `prepare` freezes it."""
    a, b = w.reshape(w.shape[0], -1), folded.reshape(folded.shape[0], -1)
    norms = (a * a).sum(1)
    dead = norms == 0
    if (np.abs(b[dead]) > 0).any():
        return None
    k = np.where(dead, np.nan, (a * b).sum(1) / np.where(dead, 1.0, norms))
    residual = np.abs(b - np.nan_to_num(k)[:, None] * a).max()
    return k if residual <= 1e-4 * (np.abs(b).max() + 1e-12) else None


def prepare(model: nn.Module, float_onnx: Any, placement: Placement) -> tuple[QatModel, dict[str, Any]]:
    """A fake-quantized copy of `model` whose only trainable tensors are the Conv/Linear parameters
    that can be written back into `float_onnx`; returns it with the write-back plan."""
    layers = trainable_layers(model, float_onnx)
    student = build_student(model, layers, placement)
    modules = dict(student.model.named_modules())
    originals = {}
    for name, (_, b_name, _, _) in layers.items():
        bias = modules[name].bias
        originals[name] = bias.detach().clone() if bias is not None and b_name is not None else None
    return student, {"layers": layers, "biases": originals}


def build_student(model: nn.Module, layers: dict[str, Any], placement: Placement) -> QatModel:
    """The fake-quantized copy of `model` that trains `layers` (from `trainable_layers`); module-level
    and deterministic so every rank of a distributed QAT builds its own from the picklable model."""
    student = copy.deepcopy(model).cpu().eval()
    for p in student.parameters():
        p.requires_grad_(False)
    modules = dict(student.named_modules())
    for name, (_, b_name, k, _) in layers.items():
        mod = modules[name]
        mod.weight.requires_grad_(True)
        dead = np.isnan(k)
        if dead.any():  # all-zero channels stay zero: their folded scale is unknown
            mask = torch.from_numpy(~dead).to(mod.weight.dtype).reshape((-1,) + (1,) * (mod.weight.dim() - 1))
            mod.weight.register_hook(lambda g, m=mask: g * m)
        if mod.bias is not None and b_name is not None:  # a bias the file has
            mod.bias.requires_grad_(True)
    return QatModel(student, placement)


def write_back(trained: nn.Module, plan: dict[str, Any], float_onnx: Any, out_path: Path) -> Path:
    """Save a copy of `float_onnx` whose Conv/Gemm weights (and biases) are the trained ones, folded."""
    import onnx

    from pipeline.atomic import atomic_path
    from pipeline.quantization.graph import set_initializer

    proto = onnx.ModelProto()
    proto.CopyFrom(float_onnx)
    inits = {t.name: t for t in proto.graph.initializer}
    modules = dict(trained.named_modules())
    for name, (w_name, b_name, k, transposed) in plan["layers"].items():
        mod = modules[name]
        w = mod.weight.detach().double().numpy()
        folded = np.nan_to_num(k).reshape((-1,) + (1,) * (w.ndim - 1)) * w
        set_initializer(proto.graph, w_name, folded.T if transposed else folded)
        old_bias = plan["biases"][name]
        if b_name is not None and old_bias is not None:
            from onnx import numpy_helper

            delta = (mod.bias.detach() - old_bias).double().numpy()
            set_initializer(proto.graph, b_name, numpy_helper.to_array(inits[b_name]).astype(np.float64) + np.nan_to_num(k) * delta)
    with atomic_path(out_path) as tmp:
        onnx.save(proto, str(tmp))
    return out_path


# -- the pass ---------------------------------------------------------------------------------
class QatConfig(StageConfig):
    """`quantize.qat`: the fine-tune budget and optimiser (used when `quantize.method: qat`)."""

    steps: int | None = Field(300, gt=0)
    minutes: float | None = Field(None, gt=0)  # wall-clock budget; the first budget to end wins
    lr: float = Field(1e-5, gt=0)
    optimizer: str = Field("adam", pattern="^(adam|sgd)$")
    temperature: float = Field(4.0, gt=0)  # distillation temperature (KL at T, as measured)
    holdout: float = Field(0.25, gt=0, lt=1)  # share of the images held out for model selection
    eval_every: int | None = Field(None, gt=0)  # steps between held-out evaluations (default: 10 per budget)
    augment: AugmentConfig | None = AugmentConfig()


@register
class Qat(QuantPass[QatConfig]):
    """Pass 60: fine-tune the torch model through the calibrated file's rounding, write the weights
    back into the float ONNX file, and keep the result only if its INT8 file scores better than PTQ."""

    name = "qat"
    order = 60

    def configure(self, stage_cfg: Any) -> QatConfig | None:
        return stage_cfg.qat if stage_cfg.method == "qat" else None

    def run(self, state: QuantState, config: QatConfig) -> None:
        import onnx

        from pipeline.quantization import saturation
        from pipeline.quantization.qat_placement import locate, quantized_tensors, quantized_weights

        if state.model is None:
            raise BadInput("quantize.method: qat needs a torch model to train; this recipe's model is a file "
                           "without one (use method: ptq)")
        assert state.prep is not None and state.calibrated is not None
        # QAT trains from the file as exported (no bias correction: the weights learn to absorb the
        # rounding), and competes with the full PTQ chain's file (state.prep, corrected)
        base = state.work / "prep.onnx"
        float_onnx, qdq = onnx.load(str(base)), onnx.load(str(state.calibrated))
        example = state.train.first_batch()[0][:2]
        placement = locate(state.model, base, quantized_tensors(qdq), example)
        placement.weights = quantized_weights(qdq, state.model)
        ptq_path = state.emitter(state.exclude, "ptq")
        ptq = state.evaluate(ptq_path)
        student, plan = prepare(state.model, float_onnx, placement)
        if not plan["layers"]:
            raise BadInput("quantize.method: qat: no torch Conv/Linear layer of the model matches the ONNX file "
                           "(a model given as a compiled graph has no torch weights to train); use method: ptq")
        build = functools.partial(build_student, layers=plan["layers"], placement=placement)  # picklable
        fit = _fit(student, state, config, build)
        prep = write_back(student.release(), plan, float_onnx, state.work / "prep_qat.onnx")
        ptq_prep, ptq_ranges = state.emitter.prep, state.emitter.ranges
        state.emitter.prep, state.emitter.ranges = prep, saturation.activation_ranges(prep, state.reader)
        qat_path = state.emitter(state.exclude, "qat")
        trained = state.evaluate(qat_path)
        kept = _better(trained, ptq)
        if kept:
            state.prep, state.ranges = prep, state.emitter.ranges
        else:  # QAT did not beat PTQ on the deployable session: ship PTQ, say so
            state.emitter.prep, state.emitter.ranges = ptq_prep, ptq_ranges
        # the winner, already emitted and scored, is the fallback's step 0 (emission does not redo it)
        state.first, state.first_scores = (qat_path, trained) if kept else (ptq_path, ptq)
        state.metrics["qat"] = {"kept": kept, "ptq": _brief(ptq), "qat": _brief(trained),
                                "placement": placement.to_dict(), "trained_layers": len(plan["layers"]),
                                "config": config.model_dump(), **fit}


def _fit(student: QatModel, state: QuantState, config: QatConfig,
         build: Callable[[nn.Module], QatModel]) -> dict[str, Any]:
    """Distil the float model into the fake-quantized student on unlabelled images (label-free
    selection on a held-out part; the un-tuned student is candidate zero, so it is never worse).
    Under `fmap run --nproc N` the workers build their own student: `build(float model)`."""
    from pipeline.pruning import distributed
    from pipeline.pruning.finetune import FinetuneSettings, finetune
    from pipeline.pruning.validation import Reference, split_holdout

    train = state.train
    parts = split_holdout(train, config.holdout, seed=state.seed)
    if parts is None:
        raise BadInput(f"quantize.qat: {len(train)} training images are too few to hold out "
                       f"{config.holdout:.0%} for model selection")
    train, held = parts
    teacher = state.model.eval()
    ref = Reference.build(teacher, held, f"{train.name} (held-out {len(held)})")
    budget = config.steps or 1000
    settings = FinetuneSettings(
        steps=config.steps, minutes=config.minutes, lr=config.lr, optimizer=config.optimizer, warmup=0.05,
        distill=True, temperature=config.temperature, alpha=1.0, augment=config.augment,
        eval_every=config.eval_every or max(budget // 10, 1), seed=state.seed)
    # data-parallel under `fmap run --nproc N` / torchrun (the student does not pickle: its source does)
    result = distributed.train(finetune, student, teacher, train, ref, settings, console=state.console,
                               source=(teacher, build))
    return {"steps_run": result["steps_run"], "best_step": result["best_step"], "seconds": result["seconds"],
            "candidate_zero": result["candidate_zero"], "best": result["best"],
            "curve": [{k: h[k] for k in ("step", "agreement", "kl", "loss")} for h in result["history"]],
            **({"distributed": result["distributed"]} if "distributed" in result else {})}


def _key(scores: dict[str, Any]) -> tuple[float, float]:
    primary = scores["accuracy"] if scores.get("accuracy") is not None else scores.get("agreement")
    return (primary or 0.0, scores.get("sqnr_db") or -math.inf)


def _better(trained: dict[str, Any], ptq: dict[str, Any]) -> bool:
    return _key(trained) > _key(ptq)


def _brief(scores: dict[str, Any]) -> dict[str, Any]:
    return {k: scores.get(k) for k in ("accuracy", "agreement", "sqnr_db", "samples")}
