"""Peak activation memory: estimated by liveness over the traced graph, and measured.

Estimate: walk the nodes in execution order; a storage is allocated when first produced and freed
after the last node that reads it (or any view / in-place alias of it). The model input and the
parameters are accounted separately. Measured: replay the CPU allocator's events recorded by
torch.profiler(profile_memory=True) for one plain forward pass. The allocator also sees scratch
buffers that an op allocates and frees before returning (oneDNN weight reorders, max-pool
indices, im2col); those are excluded from `measured_peak_bytes` (the number comparable to the
liveness estimate) and included in `measured_peak_with_scratch_bytes`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.profiling.graph import Graph

MEASURED_METHOD = ("torch.profiler(profile_memory=True) CPU allocator events of one forward pass; "
                   "buffers freed inside the op that allocated them are reported as scratch")


@dataclass
class Liveness:
    peak_bytes: int
    peak_at: str
    alive_at_peak: list[str]
    timeline: list[tuple[str, int]]  # (node, live bytes while that node runs)
    naive_sum_bytes: int  # sum of every node's output bytes: what per-layer summaries add up
    batch_size: int
    input_bytes: int
    param_bytes: int
    per_node_alloc: dict[str, int] = field(default_factory=dict)  # new bytes each node allocated


def liveness(graph: Graph) -> Liveness:
    """Peak live activation bytes, where it happens and which tensors are alive then."""
    skip = graph.input_storages
    last_use: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        for key in node.in_storages:
            last_use[key] = i
        for key, _ in node.out_storages:
            last_use[key] = max(last_use.get(key, i), i)
    end = len(graph.nodes)
    _extend_for_frames(graph, last_use)
    for key in graph.output_storages:
        last_use[key] = end  # the model's outputs outlive the forward pass
    live: dict[int, int] = {}  # storage -> bytes
    holder: dict[int, str] = {}  # storage -> latest node name that produced or aliased it
    frees: dict[int, list[int]] = {}
    peak, peak_at, alive, timeline, allocs = 0, "", [], [], {}
    for i, node in enumerate(graph.nodes):
        new = 0
        for key, nbytes in node.out_storages:
            if key in skip:
                continue
            holder[key] = node.name
            if key not in live:
                live[key] = nbytes
                new += nbytes
                frees.setdefault(last_use[key], []).append(key)
        allocs[node.name] = new
        current = sum(live.values())
        timeline.append((node.name, current))
        if current > peak:
            peak, peak_at, alive = current, node.name, [holder[k] for k in live]
        for key in frees.pop(i, []):
            live.pop(key, None)
    return Liveness(peak, peak_at, alive, timeline, sum(n.bytes for n in graph.nodes), graph.batch_size,
                    graph.input_bytes, graph.param_bytes, allocs)


def _extend_for_frames(graph: Graph, last_use: dict[int, int]) -> None:
    """A tensor handed into a module call lives until that call returns (its frame holds it),
    even if its last reader comes earlier: extend its life to the end of the outermost module
    invocation that received it."""
    last_in: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for key in node.stack:
            last_in[key] = i
    by_name = {n.name: n for n in graph.nodes}
    for node in graph.nodes:
        for src in node.inputs:
            producer = by_name.get(src)
            if producer is None:
                continue
            entered = [k for k in node.stack if k not in producer.stack]
            if not entered:
                continue
            end = last_in[entered[0]]
            for key, _ in producer.out_storages:
                if key in last_use:
                    last_use[key] = max(last_use[key], end)


@dataclass
class MeasuredPeak:
    peak_bytes: int  # tensors that outlive the op that made them
    with_scratch_bytes: int  # everything the allocator handed out
    method: str = MEASURED_METHOD


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Kineto prints start/stop and 'gpuGetDeviceCount failed' lines from C++ straight to fd 2 on
    CPU-only machines; they are noise to users, so fd 2 points at /dev/null while it runs."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure_peak(model: nn.Module, example_input: torch.Tensor, warmup: bool = True) -> MeasuredPeak:
    """Peak bytes the CPU allocator held during one `model(example_input)` under no_grad."""
    from torch.profiler import ProfilerActivity, profile

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if warmup:  # lazy one-time allocations (oneDNN caches) should not count
                model(example_input)
            with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = model(example_input)
            del out
    finally:
        model.train(was_training)
    events: list[tuple[int, int, int, bool]] = []  # (time, bytes, ptr, scratch?)
    for root in prof.profiler.kineto_results.experimental_event_tree():
        _collect(root, events, top=root)
    events.sort(key=lambda e: e[0])
    cur = peak = cur_all = peak_all = 0
    for _, nbytes, _, scratch in events:
        cur_all += nbytes
        peak_all = max(peak_all, cur_all)
        if not scratch:
            cur += nbytes
            peak = max(peak, cur)
    return MeasuredPeak(peak, peak_all)


def _collect(root: Any, events: list[tuple[int, int, int, bool]], top: Any) -> None:
    """Allocation events under one top-level op; an alloc freed under the same op is scratch."""
    allocs: list[Any] = []
    stack = [root]
    while stack:
        n = stack.pop()
        if type(n.extra_fields).__name__ == "_ExtraFields_Allocation":
            allocs.append(n)
        stack.extend(n.children)
    if type(root.extra_fields).__name__ == "_ExtraFields_Allocation":  # a free between ops
        f = root.extra_fields
        events.append((root.start_time_ns, int(f.alloc_size), int(f.ptr), False))
        return
    open_ptrs: dict[int, int] = {}
    scratch_ptrs: set[tuple[int, int]] = set()
    for n in sorted(allocs, key=lambda n: n.start_time_ns):
        f = n.extra_fields
        if f.alloc_size > 0:
            open_ptrs[f.ptr] = n.start_time_ns
        elif f.ptr in open_ptrs:
            scratch_ptrs.add((f.ptr, open_ptrs.pop(f.ptr)))
            scratch_ptrs.add((f.ptr, n.start_time_ns))
    for n in allocs:
        f = n.extra_fields
        events.append((n.start_time_ns, int(f.alloc_size), int(f.ptr), (f.ptr, n.start_time_ns) in scratch_ptrs))
