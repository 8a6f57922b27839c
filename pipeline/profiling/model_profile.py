"""One call that profiles a model into a JSON-ready dict: per-layer table, totals, memory, timeline.

The profile stage, `fmap profile` and the prune stage (via `summarize`) all go through here, so the
numbers they report are computed one way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.profiling.graph import trace_graph
from pipeline.profiling.memory import liveness, measure_peak
from pipeline.units import human_bytes


def batch_of(example_input: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """`example_input` resized to `batch_size` along dim 0 (repeating its first sample)."""
    if batch_size is None or batch_size == example_input.shape[0]:
        return example_input
    first = example_input[:1]
    return first.repeat(batch_size, *([1] * (first.dim() - 1))).contiguous()


def profile_model(model: nn.Module, example_input: torch.Tensor, batch_size: int | None = None,
                  measure: bool = True) -> dict[str, Any]:
    """Trace, estimate liveness and (optionally) measure the allocator peak at `batch_size`."""
    x = batch_of(example_input, batch_size)
    bs = int(x.shape[0])
    graph = trace_graph(model, x)
    live = liveness(graph)
    layers = [n.to_dict() for n in graph.nodes]
    macs = int(sum(n.macs for n in graph.nodes))
    memory: dict[str, Any] = {
        "batch_size": bs,
        "liveness_peak_bytes": live.peak_bytes,
        "liveness_peak_per_sample_bytes": live.peak_bytes // max(bs, 1),
        "peak_at": live.peak_at,
        "alive_at_peak": live.alive_at_peak,
        "measured_peak_bytes": None,
        "measured_peak_with_scratch_bytes": None,
        "measured_method": None,
        "naive_sum_bytes": live.naive_sum_bytes,
        "input_bytes": live.input_bytes,
        "param_bytes": live.param_bytes,
    }
    if measure:
        measured = measure_peak(model, x)
        memory.update(measured_peak_bytes=measured.peak_bytes,
                      measured_peak_with_scratch_bytes=measured.with_scratch_bytes,
                      measured_method=measured.method)
    totals = {
        "params": graph.total_params,
        "macs": macs,
        "macs_per_sample": macs // max(bs, 1),
        "nodes": len(graph.nodes),
        "graph_method": graph.method,
        "fallback_reason": graph.fallback_reason or None,
        "input_shape": list(x.shape),
    }
    return {"layers": layers, "totals": totals, "memory": memory,
            "timeline": [[name, int(b)] for name, b in live.timeline]}


def summarize(model: nn.Module, example_input: torch.Tensor) -> dict[str, Any]:
    """MACs, parameters and liveness peak of one forward pass: what prune compares before/after."""
    graph = trace_graph(model, example_input)
    live = liveness(graph)
    return {
        "macs": int(sum(n.macs for n in graph.nodes)),
        "params": int(graph.total_params),
        "liveness_peak_bytes": int(live.peak_bytes),
        "batch_size": graph.batch_size,
        "graph_method": graph.method,
    }


def to_markdown(profile: dict[str, Any], title: str = "Feature-map profile") -> str:
    """A human report: memory summary, then the per-layer table."""
    mem, tot = profile["memory"], profile["totals"]
    lines = [f"# {title}", "",
             f"Input {tot['input_shape']}, {tot['params']:,} parameters, {tot['macs']:,} MACs "
             f"(graph traced with {tot['graph_method']}).", "",
             "| memory | bytes |", "|---|---|",
             f"| liveness peak (batch {mem['batch_size']}) | {_bytes(mem['liveness_peak_bytes'])} |",
             f"| liveness peak per sample | {_bytes(mem['liveness_peak_per_sample_bytes'])} |",
             f"| measured peak (allocator) | {_bytes(mem['measured_peak_bytes'])} |",
             f"| measured peak incl. in-op scratch | {_bytes(mem['measured_peak_with_scratch_bytes'])} |",
             f"| naive sum of all outputs | {_bytes(mem['naive_sum_bytes'])} |",
             f"| input | {_bytes(mem['input_bytes'])} |",
             f"| parameters + buffers | {_bytes(mem['param_bytes'])} |", "",
             f"Peak at `{mem['peak_at']}` with alive: " + ", ".join(f"`{n}`" for n in mem["alive_at_peak"]), "",
             "| " + " | ".join(LAYER_COLUMNS) + " |", "|" + "---|" * len(LAYER_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in layer_rows(profile["layers"])]
    red = profile.get("redundancy") or {}
    if red:
        lines += ["", "| layer | channels | dead | mean APoZ | pairs |r|>0.95 | mean rank | measured at |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in red.items():
            rank = "-" if r["mean_rank"] is None else f"{r['mean_rank']:.1f}"
            lines.append(f"| {name} | {r['channels']} | {r['dead']} | {r['mean_apoz']:.3f} | "
                         f"{r['high_corr_pairs']} | {rank} | {r['measured_at']} |")
    return "\n".join(lines) + "\n"


LAYER_COLUMNS = ("layer", "type", "output", "channels", "volume", "params", "MACs", "bytes", "RF", "stride")


def layer_rows(layers: list[dict[str, Any]]) -> list[list[str]]:
    """The per-layer table, formatted once for every renderer: profile.md, the console, report.html."""
    rows = []
    for r in layers:
        shape = "×".join(str(d) for d in r["output_shape"]) if r.get("output_shape") else "-"
        rows.append([r["name"], r["type"], shape, _count(r.get("channels")), _count(r.get("volume")),
                     _count(r.get("params")), _count(r.get("macs")), _bytes(r.get("bytes")),
                     str(r.get("receptive_field", "-")), str(r.get("stride", "-"))])
    return rows


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else "-"


def _bytes(n: float | None) -> str:
    return human_bytes(n, missing="-")
