"""Accuracy-aware fallback: keep in float the layers whose float copy measurably helps, nothing else.

Each step takes the few layers with the largest local quantization error (debug.tensor_errors, run
with graph outputs added, which defeats onnxruntime's fused integer kernels) as *candidates only*,
then measures each one by ablation on the deployable session: that layer (with its fused
activation and consumers) kept in float, re-quantized, scored with every graph optimisation on,
exactly as it will run. The best candidate is kept only if it beats the current model; otherwise
the fallback stops and the step is recorded as undone. So the returned model is never worse than
step 0, and every step, with every candidate tried, is in the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.quantization.debug import TensorError
from pipeline.quantization.passes import QuantPass, QuantState, register


@dataclass
class FallbackOutcome:
    path: Path
    scores: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    excluded_nodes: list[str] = field(default_factory=list)
    met: bool = True
    chosen_step: int = 0


def run_fallback(*, expand: Callable[[str], list[str]], first: Path, first_scores: dict[str, Any],
                 quantize: Callable[[list[str], str], Path], evaluate: Callable[[Path], dict[str, Any]],
                 meets: Callable[[dict[str, Any]], bool], errors: Callable[[Path], list[TensorError]],
                 base_exclude: list[str], max_float_layers: int, max_steps: int,
                 candidates: int = 3) -> FallbackOutcome:
    """`quantize(exclude, tag)` writes a model and returns its path; `meets(scores)` is the target;
    `expand(layer)` names the nodes that keep `layer` float (debug.nodes_to_keep_float)."""
    out = FallbackOutcome(first, first_scores, excluded_nodes=list(base_exclude), met=meets(first_scores))
    out.steps.append(_step(0, [], first_scores, accepted=True))
    step = 0
    while not out.met and step < max_steps and len(out.float_layers) < max_float_layers:
        step += 1
        ranked = dict.fromkeys(t.layer for t in errors(out.path) if t.layer)
        picks = [layer for layer in ranked if layer not in out.float_layers and layer not in out.excluded_nodes]
        if not picks:
            break
        tried = []
        for i, layer in enumerate(picks[:candidates]):
            exclude = out.excluded_nodes + [n for n in expand(layer) if n not in out.excluded_nodes]
            path = quantize(exclude, f"{step}_{i}")
            tried.append((layer, path, exclude, evaluate(path)))
        layer, path, exclude, scores = max(tried, key=lambda t: _quality(t[3]))
        record = _step(step, out.float_layers + [layer], scores, accepted=_quality(scores) > _quality(out.scores))
        record["tried"] = [{"layer": t[0], "accuracy": t[3].get("accuracy"), "agreement": t[3].get("agreement")}
                           for t in tried]
        out.steps.append(record)
        if not record["accepted"]:  # no single layer in float helps: undo and stop
            record["float_layers"] = list(out.float_layers)
            break
        out.path, out.scores, out.excluded_nodes = path, scores, exclude
        out.float_layers.append(layer)
        out.chosen_step = step
        out.met = meets(scores)
    return out


def _quality(scores: dict[str, Any]) -> tuple[float, float]:
    """Accuracy when labelled, then agreement: the order in which steps compete."""
    agreement = scores.get("agreement")
    agreement = float(agreement) if agreement is not None else float("-inf")
    accuracy = scores.get("accuracy")
    return (float(accuracy) if accuracy is not None else agreement, agreement)


def _step(step: int, layers: list[str], scores: dict[str, Any], accepted: bool) -> dict[str, Any]:
    return {"step": step, "float_layers": list(layers), "accuracy": scores.get("accuracy"),
            "agreement": scores.get("agreement"), "accepted": accepted}


def meets(scores: dict[str, Any], target: Any) -> bool:
    """The fallback target. Without labels a max_accuracy_drop is read as a minimum agreement of 1 - drop."""
    ok = True
    if target.max_accuracy_drop is not None:
        if scores.get("accuracy") is not None and scores.get("reference_accuracy") is not None:
            ok &= scores["reference_accuracy"] - scores["accuracy"] <= target.max_accuracy_drop + 1e-12
        else:
            ok &= (scores.get("agreement") or 0.0) >= 1 - target.max_accuracy_drop
    if target.min_agreement is not None:
        ok &= (scores.get("agreement") or 0.0) >= target.min_agreement
    return bool(ok)


# -- the pass ---------------------------------------------------------------------------------
@register
class Fallback(QuantPass[Any]):
    """Pass 80: keep layers float by ablation until the target is met (config: quantize.fallback)."""

    name = "fallback"
    order = 80

    def configure(self, stage_cfg: Any) -> Any:
        return stage_cfg.fallback

    def run(self, state: QuantState, config: Any) -> None:
        from pipeline.quantization.debug import nodes_to_keep_float, tensor_errors

        assert state.prep is not None and state.first is not None and state.first_scores is not None
        prep = state.prep
        state.outcome = run_fallback(
            expand=lambda layer: nodes_to_keep_float(layer, prep), first=state.first,
            first_scores=state.first_scores, quantize=state.emitter, evaluate=state.evaluate,
            meets=lambda s: meets(s, config), errors=lambda p: tensor_errors(prep, p, state.debug_reader),
            base_exclude=state.exclude, max_float_layers=config.max_float_layers, max_steps=config.max_steps,
            candidates=config.candidates)
