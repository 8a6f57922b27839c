"""A torch.export program behind a plain nn.Module (the `exported:` source)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def input_meta(program: Any) -> list[Any] | None:
    """The first user input's shape as exported (ints, or SymInts for dynamic dims)."""
    names = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            val = node.meta.get("val")
            return list(val.shape) if val is not None else None
    return None


def _static_batch(program: Any) -> int | None:
    """The batch size baked into the program's first input, or None when it is symbolic."""
    shape = input_meta(program)
    dim = shape[0] if shape else None
    return dim if isinstance(dim, int) else None


class ExportedModule(nn.Module):
    """`program.module()` behind a plain nn.Module: a program exported at batch 1 runs larger
    batches sample by sample (its shape guards would refuse them), and eval() is a no-op."""

    fmap_graph_only = True

    def __init__(self, program: Any) -> None:
        super().__init__()
        self.graph = program.module()
        self.batch = _static_batch(program)

    def forward(self, x: Any) -> Any:
        if self.batch is not None and x.shape[0] != self.batch:
            if self.batch != 1:
                raise ValueError(f"the exported program takes batches of {self.batch} only, got {x.shape[0]}")
            return torch.cat([self.graph(x[i:i + 1]) for i in range(x.shape[0])])
        return self.graph(x)

    def train(self, mode: bool = True) -> ExportedModule:
        return self  # torch.export programs have no train mode
