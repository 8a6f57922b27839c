"""Feature-map profiling: shapes and formulas, liveness peak memory, streaming channel statistics.

Modules: formulas (closed-form seed formulas), graph (trace shapes/params/MACs/receptive field),
memory (liveness and measured peak), stats (streaming per-channel statistics), redundancy
(summaries), summary (the profile dict), plots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


def summarize(model: torch.nn.Module, example_input: torch.Tensor) -> dict[str, Any]:
    """{macs, params, liveness_peak_bytes, batch_size, graph_method} of one forward pass.

    Lazy wrapper so that importing `pipeline.profiling.stats` does not import torch.fx machinery.
    """
    from pipeline.profiling.model_profile import summarize as _summarize

    return _summarize(model, example_input)
