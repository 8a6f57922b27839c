"""Accuracy-aware fallback: keep the layers that hurt most in float, re-quantize, repeat.

Each step ranks layers by their local quantization noise (debug.tensor_errors), adds the worst
ones not yet in float to `nodes_to_exclude`, re-quantizes and re-scores, until the target is met
or the budget (max_steps, max_float_layers) is spent. Every step is reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.quantization.debug import TensorError, nodes_to_keep_float


@dataclass
class FallbackOutcome:
    path: Path
    scores: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    excluded_nodes: list[str] = field(default_factory=list)
    met: bool = True
    chosen_step: int = 0


def run_fallback(*, float_path: Path, first: Path, first_scores: dict[str, Any],
                 quantize: Callable[[list[str], int], Path], evaluate: Callable[[Path], dict[str, Any]],
                 meets: Callable[[dict[str, Any]], bool], errors: Callable[[Path], list[TensorError]],
                 base_exclude: list[str], max_float_layers: int, max_steps: int) -> FallbackOutcome:
    """`quantize(exclude, step)` writes a model and returns its path; `meets(scores)` is the target.

    If the target is never met, the best step (by accuracy, else agreement) is the one returned:
    keeping layers float can make things worse when the error is spread over many layers.
    """
    outcome = FallbackOutcome(first, first_scores, excluded_nodes=list(base_exclude))
    best = (_quality(first_scores), first, first_scores, 0, [], list(base_exclude))
    outcome.steps.append(_step(0, [], first_scores))
    outcome.met = meets(first_scores)
    per_step = max(1, math.ceil(max_float_layers / max(1, max_steps)))
    step = 0
    while not outcome.met and step < max_steps and len(outcome.float_layers) < max_float_layers:
        step += 1
        ranked = [t.layer for t in errors(outcome.path) if t.layer]
        new = [layer for layer in dict.fromkeys(ranked)
               if layer not in outcome.float_layers and layer not in outcome.excluded_nodes]
        new = new[: min(per_step, max_float_layers - len(outcome.float_layers))]
        if not new:
            break
        outcome.float_layers.extend(new)
        for layer in new:
            outcome.excluded_nodes.extend(n for n in nodes_to_keep_float(layer, float_path)
                                          if n not in outcome.excluded_nodes)
        path = quantize(outcome.excluded_nodes, step)
        scores = evaluate(path)
        outcome.path, outcome.scores = path, scores
        outcome.steps.append(_step(step, list(outcome.float_layers), scores))
        outcome.met = meets(scores)
        if _quality(scores) > best[0]:
            best = (_quality(scores), path, scores, step, list(outcome.float_layers), list(outcome.excluded_nodes))
    outcome.chosen_step = step
    if not outcome.met and best[3] != step:
        _, outcome.path, outcome.scores, outcome.chosen_step, outcome.float_layers, outcome.excluded_nodes = best
    return outcome


def _quality(scores: dict[str, Any]) -> float:
    value = scores.get("accuracy")
    if value is None:
        value = scores.get("agreement")
    return float(value) if value is not None else float("-inf")


def _step(step: int, layers: list[str], scores: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, "float_layers": layers, "accuracy": scores.get("accuracy"),
            "agreement": scores.get("agreement")}
