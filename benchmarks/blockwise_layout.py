"""Block-wise distillation's memory layout: one training step of each EfficientNet-Lite0 unit in the
default (NCHW) layout and in channels-last, side by side.

The units are those block-wise distillation trains at -30% MACs (the kept blocks around each
dropped one, table "At issue 18's budget"): blocks 3-5, 6-8, 9-11 and 12-15 with 4, 7, 10, 13
and 14 bypassed. One step = forward + MSE loss + backward + Adam step on a batch of 32 real crops'
feature maps, as `pipeline.pruning.blockwise._train_block` runs it; both layouts are timed
round-robin in one loop, so a busy machine slows both alike.

    python benchmarks/blockwise_layout.py [--iterations 12] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADING = "## Block-wise distillation: channels-last against the default layout (EfficientNet-Lite0)"
UNITS = [[3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14, 15]]
DROPPED = [4, 7, 10, 13, 14]


def step_ms(unit: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, channels_last: bool, iterations: int) -> list[float]:
    """Milliseconds of each of `iterations` training steps (after one warm-up step); channels-last
    through the pipeline's own `_channels_last`, the batch laid out inside the step as there."""
    from pipeline.pruning.blockwise import _channels_last

    unit = copy.deepcopy(unit)
    opt = torch.optim.Adam(unit.parameters(), lr=1e-4)
    out = []
    with _channels_last(unit, x) if channels_last else contextlib.nullcontext(lambda t: t) as layout:
        for i in range(iterations + 1):
            t = time.perf_counter()
            loss = F.mse_loss(unit(layout(x)), layout(y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i:
                out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=12, help="timed steps per unit and layout")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    args = ap.parse_args()

    from benchmarks.common import cpu_flags, machine_line, write_section
    from benchmarks.pretrained import efficientnet_lite0, lite0_images
    from pipeline.pruning.blockwise import _apply, chain_input
    from pipeline.pruning.depth import drop_blocks

    torch.set_num_threads(args.threads)
    teacher = efficientnet_lite0().eval()
    student = drop_blocks(copy.deepcopy(teacher), [f"_blocks.{i}" for i in DROPPED]).eval()
    x = chain_input(teacher, teacher._blocks, lite0_images(32, seed=0))
    x = _apply(torch.nn.Sequential(*(teacher._blocks[i] for i in range(UNITS[0][0]))), x)  # the first unit's input
    rows = []
    for unit_ids in UNITS:  # each unit on the original's input to it (what it sees is what matters, not its values)
        s_unit = torch.nn.Sequential(*(student._blocks[i] for i in unit_ids))
        y = _apply(torch.nn.Sequential(*(teacher._blocks[i] for i in unit_ids)), x)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(3):  # round-robin in three slices, so that a change of load hits both layouts
            for layout in (False, True):
                times[layout] += step_ms(s_unit, x, y, layout, max(1, args.iterations // 3))
        nchw, last = statistics.median(times[False]), statistics.median(times[True])
        rows.append((f"{unit_ids[0]}-{unit_ids[-1]}", tuple(x.shape[1:]), nchw, last))
        print(f"unit {rows[-1][0]} {rows[-1][1]}: NCHW {nchw:.0f} ms, channels-last {last:.0f} ms, "
              f"x{nchw / last:.2f}", flush=True)
        x = y

    total = sum(r[2] for r in rows) / sum(r[3] for r in rows)
    lines = [HEADING, "",
             f"`python benchmarks/blockwise_layout.py --iterations {args.iterations} --threads {args.threads} --write`"
             f" — one training step (forward, MSE, backward, Adam; batch 32 of real crops' feature maps) of each "
             f"unit that block-wise distillation trains at -30% MACs, both layouts round-robin in one loop; median "
             f"of {args.iterations}. CPU flags: {cpu_flags()}. "
             f"{machine_line(args.threads)}", "",
             "| unit (blocks) | input (C, H, W) | NCHW ms | channels-last ms | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {u} | {shape} | {a:.0f} | {b:.0f} | {a / b:.2f}x |" for u, shape, a, b in rows]
    lines += ["", f"All four units (one step each): {total:.2f}x. `pipeline/pruning/blockwise.py` trains in channels-last."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(text, HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
