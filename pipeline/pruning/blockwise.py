"""Block-wise distillation: train each block of a residual chain to reproduce the original's output.

After pruning, fine-tuning the whole network against the original's logits on a few unlabelled
photos moved EfficientNet-Lite0 no further than the least-squares refit (its held-out agreement
fell with every step). Training one block at a time is a much better-posed problem: the target is
the original block's whole feature map (thousands of numbers per image instead of a top-1), each
step costs one block's forward and backward instead of the network's, and unchanged blocks cost
nothing. The blocks are trained in order, each on the outputs of the already-trained student blocks
before it (so each corrects what the earlier ones left), against the original's outputs on the
original's inputs. BatchNorm statistics and dropout stay in eval mode. A unit that training made
worse (its error on the training images rose: too high an lr, as 3e-3 did to Lite0's last unit)
gets its weights from before training back, so no later unit inherits the damage.

A dropped block is bridged by both its neighbours: the kept block before the gap, the dropped
block(s) and the kept block after it form one unit, trained together to reproduce the original's
output at the unit's end (the output between them is free). Training only the block after the gap
left EfficientNet-Lite0 at 78.8% agreement (-30% MACs, 576 crops); the two neighbours together
reached 81.8% in the same number of steps (benchmarks/RESULTS.md).

The chain is the nn.Sequential / nn.ModuleList that holds the model's blocks (EfficientNet's
`_blocks`, MobileNet's `features`); a block whose output width pruning changed cannot be compared
with the original's and is skipped, as are units without parameters.

Units run in channels-last memory layout while they train and propagate (4-D feature maps only):
a training step of Lite0's units is 1.5-1.7x faster that way on CPU, 1.63x over all four
(benchmarks/blockwise_layout.py), so the same budget buys more epochs (14 instead of 9 in issue
18's 10 minutes). The weights are handed back in the default layout.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BlockwiseSettings:
    epochs: float = 14.0  # passes over the images, per block
    lr: float = 1e-3  # Adam, cosine decay to zero per block
    batch_size: int = 32
    seed: int = 0
    # wall-clock budget of all units together (None: epochs only): each unit that trains gets an equal
    # share of what is left, and ends at its share or its epochs, whichever comes first
    minutes: float | None = None


class _Captured(Exception):
    """Raised by the capture hook to stop a forward once the chain's input is recorded."""


@torch.no_grad()
def chain_input(model: nn.Module, chain: nn.Module, images: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """What the chain's first block receives for every image (the forward stops there)."""
    return captured(model, next(iter(chain.children())), images, chunk)


@torch.no_grad()
def captured(model: nn.Module, module: nn.Module, images: torch.Tensor, chunk: int = 32, *,
             output: bool = False, channels_last: bool = False) -> torch.Tensor:
    """`module`'s first input (or its output) for every image, in eval mode; each forward stops
    there. With `channels_last` the model runs in that layout (faster on CPU); the result is
    contiguous either way."""
    got: list[torch.Tensor] = []

    def keep(value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"expected a tensor at the capture point, got {type(value).__name__}")
        got.append(value.detach().contiguous())
        raise _Captured

    h = (module.register_forward_hook(lambda _m, _a, out: keep(out)) if output
         else module.register_forward_pre_hook(lambda _m, args: keep(args[0])))
    was_training = model.training
    try:
        with (_channels_last(model, images) if channels_last else nullcontext(lambda t: t)) as layout:
            for i in range(0, len(images), chunk):
                try:
                    model.eval()(layout(images[i:i + chunk]))
                except _Captured:
                    pass
    finally:
        h.remove()
        model.train(was_training)
    if sum(len(g) for g in got) != len(images):
        raise RuntimeError("the capture point did not run on every batch")
    return torch.cat(got)


def _has_parameters(block: nn.Module) -> bool:
    """False for a dropped block (its Bypass has none)."""
    return any(True for _ in block.parameters())


def find_chain(teacher: nn.Module, block_names: list[str]) -> str | None:
    """The container holding the given blocks (all must share one), or None."""
    parents = {n.rpartition(".")[0] for n in block_names}
    return parents.pop() if len(parents) == 1 else None


def units(blocks: list[nn.Module]) -> list[list[int]]:
    """Group a chain's blocks into the units trained together: every block without parameters (a
    dropped one) joins the kept block before it and the kept block after it, so both neighbours
    learn to bridge the gap; every other block is a unit of its own."""
    dropped = [not _has_parameters(b) for b in blocks]
    out: list[list[int]] = []
    cur: list[int] = []
    for i in range(len(blocks)):
        cur.append(i)
        if not dropped[i] and not (i + 1 < len(blocks) and dropped[i + 1]):
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def distill_blocks(student: nn.Module, teacher: nn.Module, chain_name: str, images: torch.Tensor,
                   settings: BlockwiseSettings, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Train `student`'s blocks of `chain_name` in place, unit by unit (see `units`), in order; returns
    a report of each unit."""
    s_chain, t_chain = student.get_submodule(chain_name), teacher.get_submodule(chain_name)
    s_blocks, t_blocks = list(s_chain.children()), list(t_chain.children())
    if len(s_blocks) != len(t_blocks):
        raise RuntimeError(f"chain '{chain_name}' has {len(s_blocks)} blocks in the student, {len(t_blocks)} in the original")
    if not _chains(teacher, t_chain, images[:1]):
        return {"chain": chain_name, "blocks": [], "skipped": "its blocks do not feed each other in order"}
    start = time.monotonic()
    xs = chain_input(student, s_chain, images)
    xt = chain_input(teacher, t_chain, images)
    student.eval()
    teacher.eval()
    rows = []
    grouped = units(s_blocks)
    deadline = None if settings.minutes is None else time.monotonic() + settings.minutes * 60.0
    for k, unit in enumerate(grouped):
        names = [f"{chain_name}.{i}" for i in unit]
        name = names[0] if len(unit) == 1 else f"{names[0]}..{unit[-1]}"
        s_unit = nn.Sequential(*(s_blocks[i] for i in unit))
        yt = _propagate(nn.Sequential(*(t_blocks[i] for i in unit)), xt, log)
        progress = lambda m, name=name: log(f"prune: block-wise distillation {name}: {m}")  # noqa: E731
        share = None if deadline is None else _share(deadline, grouped[k:], s_blocks)
        row = {"block": name, "members": names, **_train_block(s_unit, xs, yt, settings, progress, share)}
        rows.append(row)
        if row["status"] == "trained":
            log(f"prune: block-wise distillation {name}: relative error {row['error_before']:.4f} -> "
                f"{row['error_after']:.4f} ({row['steps']} steps, {row['seconds']:.0f} s)")
        elif row["status"].startswith("reverted"):
            log(f"prune: block-wise distillation {name}: relative error rose from {row['error_before']:.4f} to "
                f"{row['error_after'] if row['error_after'] is not None else 'not finite'}; its weights from before "
                f"training are kept (lower blockwise.lr)")
        if k + 1 < len(grouped):  # the last unit's outputs would feed nothing
            xs, xt = _propagate(s_unit, xs, log), yt
    trained = [r for r in rows if r["status"] == "trained"]
    return {"chain": chain_name, "images": len(images), "epochs": settings.epochs, "lr": settings.lr,
            "minutes": settings.minutes, "blocks": rows, "trained": len(trained),
            "seconds": round(time.monotonic() - start, 2)}


def _share(deadline: float, remaining: list[list[int]], blocks: list[nn.Module]) -> float:
    """Seconds for the next unit: an equal part of the time left among the units still to come that
    have parameters. A unit that needs no training (the unchanged ones before the first pruned
    block) or stops at its epochs leaves its part to the later ones."""
    with_params = sum(1 for u in remaining if any(_has_parameters(blocks[i]) for i in u))
    return max(0.0, deadline - time.monotonic()) / max(1, with_params)


@torch.no_grad()
def _chains(model: nn.Module, container: nn.Module, example: torch.Tensor) -> bool:
    """Every block of `container` runs once and receives the previous block's output object."""
    blocks = list(container.children())
    seen: list[tuple[int, Any, Any]] = []
    hooks = [b.register_forward_hook(lambda _m, a, o, i=i: seen.append((i, a[0] if a else None, o)))
             for i, b in enumerate(blocks)]
    was_training = model.training
    try:
        model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if [i for i, _, _ in seen] != list(range(len(blocks))):
        return False
    return all(seen[k][1] is seen[k - 1][2] for k in range(1, len(seen)))


@contextmanager
def _channels_last(block: nn.Module, x: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """While open, `block`'s weights are channels-last; yields the function that lays out its input
    the same way (identity for tensors that are not 4-D). The default layout is restored on exit."""
    if x.dim() != 4:
        yield lambda t: t
        return
    block.to(memory_format=torch.channels_last)
    try:
        yield lambda t: t.contiguous(memory_format=torch.channels_last)
    finally:
        block.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def _apply(block: nn.Module, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    with _channels_last(block, x) as layout:
        return torch.cat([block(layout(x[i:i + chunk])).contiguous() for i in range(0, len(x), chunk)])


def _propagate(unit: nn.Module, x: torch.Tensor, log: Callable[[str], None]) -> torch.Tensor:
    """The unit's output for every image, through onnxruntime where it reproduces torch (5-6x faster
    on Lite0, see pipeline.pruning.fast_inference): with it, Lite0's 14-epoch phase spent 40 s of its
    398 s outside the units' training steps (benchmarks/RESULTS.md)."""
    from pipeline.pruning.fast_inference import forward_all

    return forward_all(unit, x, log=lambda m: log(f"prune: block-wise distillation: {m}"))[0]


def _relative_error(block: nn.Module, x: torch.Tensor, y: torch.Tensor, var: float) -> float:
    with torch.no_grad():
        return float(F.mse_loss(_apply(block, x), y)) / var


def time_left(budget_s: float, since: float, check_s: float) -> float:
    """Training seconds left of `budget_s` begun at `since` (monotonic clock), keeping back `check_s`
    for the error check that follows training (about as long as the one before it)."""
    return max(0.0, budget_s - (time.monotonic() - since) - check_s)


PROGRESS_EVERY_S = 15.0  # a line at least this often inside a long block (CI logs have no live bar)


def adam_cosine(params: list[nn.Parameter], n: int, steps: int, batch_size: int, lr: float, seed: int,
                loss_of: Callable[[torch.Tensor], torch.Tensor], log: Callable[[str], None],
                seconds: float | None = None) -> int:
    """Adam steps on `loss_of(indices)` over shuffled batches of range(n) until `steps` or `seconds`
    of wall clock, whichever ends first; the lr decays to zero on a cosine over that progress (as the
    fine-tune's budget does), so a time-bound run still ends at lr 0. A progress line at least every
    PROGRESS_EVERY_S seconds. Returns the steps taken (at least one)."""
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = said = time.monotonic()

    def progress(step: int) -> float:
        p = step / steps
        return p if seconds is None else max(p, (time.monotonic() - start) / max(seconds, 1e-9))

    step = 0
    while step == 0 or progress(step) < 1:
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            p = progress(step)
            if step and p >= 1:
                break
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
            loss = loss_of(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if time.monotonic() - said > PROGRESS_EVERY_S:
                said = time.monotonic()
                budget = f"{steps}" if seconds is None else f"{steps} or {seconds:.0f} s"
                log(f"step {step}/{budget}, loss {loss.item():.4f}")
    return step


def _train_block(block: nn.Module, xs: torch.Tensor, yt: torch.Tensor, s: BlockwiseSettings,
                 log: Callable[[str], None] = lambda m: None, seconds: float | None = None) -> dict[str, Any]:
    params = [p for p in block.parameters() if p.requires_grad]
    if not params:
        return {"status": "no parameters (dropped)"}
    with torch.no_grad():
        probe = block(xs[:1])
    if probe.shape[1:] != yt.shape[1:]:
        return {"status": "output width changed by pruning"}
    var = float(yt.var()) + 1e-12
    sample = slice(0, min(len(xs), 256))
    checked = time.monotonic()
    before = _relative_error(block, xs[sample], yt[sample], var)
    if before < 1e-10:
        return {"status": "unchanged"}
    start = time.monotonic()
    initial = {k: v.detach().clone() for k, v in block.state_dict().items()}
    steps = max(1, int(s.epochs * len(xs) / s.batch_size))
    if seconds is not None:  # the share covers both error checks (each about as long as the first)
        seconds = time_left(seconds, checked, start - checked)
    with torch.enable_grad(), _channels_last(block, xs) as layout:
        steps = adam_cosine(params, len(xs), steps, s.batch_size, s.lr, s.seed,
                            lambda idx: F.mse_loss(block(layout(xs[idx])), layout(yt[idx])) / var, log, seconds)
    after = _relative_error(block, xs[sample], yt[sample], var)
    status = "trained"
    if not after < before:  # a unit that came out worse (too high an lr) must not pass its error on
        block.load_state_dict(initial)
        status = "reverted (training raised the error)"
    return {"status": status, "error_before": round(before, 6),
            "error_after": round(after, 6) if math.isfinite(after) else None,
            "steps": steps, "seconds": round(time.monotonic() - start, 2)}
