"""Where head distillation's time went, and what pipeline.pruning.fast_inference and the corner feed
buy back: EfficientNet-Lite0 (ImageNet weights) on real crops, side by side in one run.

1. One no-grad forward of the whole model at batch 64 (what computing the original's logits and the
   student's chain outputs costs per image): torch eager in the default layout, torch in
   channels-last (what the pipeline used before), onnxruntime FP32 through fast_inference's own
   export. All variants are timed round-robin (pipeline.verify.latency.measure), so a change of
   load hits all alike.
2. One head-distillation training step (forward, KL, backward, Adam; batch 64) with the chain
   replaced by its cached output, fed the full 224x224 images (before) and the 8x8 corner the head
   now feeds (`pipeline.pruning.head._replay_input`): the layers before the chain still run.

    python benchmarks/fast_targets.py [--iterations 6] [--write]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADING = "## Targets through onnxruntime: the head's forwards and steps (EfficientNet-Lite0)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=6, help="timed batches per variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    args = ap.parse_args()

    from benchmarks.common import cpu_flags, machine_line, write_section
    from benchmarks.pretrained import efficientnet_lite0, lite0_images
    from pipeline.pruning.fast_inference import _onnxruntime, _Tapped
    from pipeline.pruning.head import _chain_replaced, _corner, _params_after
    from pipeline.verify.latency import measure

    torch.set_num_threads(args.threads)
    model = efficientnet_lite0().eval()
    x = lite0_images(64, seed=0)
    batch = len(x)

    # 1. forwards; channels-last on a copy laid out once, so every variant can run in one loop
    session = _onnxruntime(_Tapped(model, []), x[:1])
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)  # as blockwise._channels_last lays out
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
        diff = float((session(x)[0] - want).abs().max()) / float(want.abs().max())
        forwards = measure({"torch eager, default layout": lambda: model(x),
                            "torch eager, channels-last": lambda: cl_model(xc),
                            "onnxruntime FP32 (fast_inference)": lambda: session(x)},
                           warmup=1, iterations=args.iterations)

    # 2. head steps
    params = _params_after(model, "_blocks", x[:1])
    target = torch.softmax(want, 1)
    opt = torch.optim.Adam(params, lr=1e-6)
    with _chain_replaced(model, "_blocks") as cached:
        cached.value = torch.randn(batch, 320, 7, 7)

        def step(inp: torch.Tensor) -> None:
            loss = F.kl_div(F.log_softmax(model(inp), 1), target, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        corner = _corner(x)
        steps = measure({"full images (before)": lambda: step(x), "8x8 corner (now)": lambda: step(corner)},
                        warmup=1, iterations=args.iterations)

    fwd = {k: statistics.median(v) / batch for k, v in forwards.items()}  # measure's samples are ms
    stp = {k: statistics.median(v) for k, v in steps.items()}
    base_fwd, base_step = fwd["torch eager, channels-last"], stp["full images (before)"]
    lines = [HEADING, "",
             f"`python benchmarks/fast_targets.py --iterations {args.iterations} --threads {args.threads} --write`"
             f" — batches of {batch} real crops, every variant round-robin in one loop; median "
             f"of {args.iterations}. onnxruntime's logits differ from torch's by {diff:.1e} of their largest "
             f"magnitude. CPU flags: {cpu_flags()}. {machine_line(args.threads)}", "",
             "| no-grad forward of the whole model | ms per image | against channels-last |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {base_fwd / v:.2f}x |" for k, v in fwd.items()]
    lines += ["", "| head-distillation step (batch 64, chain replaced by its cached output) | ms | speed-up |",
              "|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {base_step / v:.2f}x |" for k, v in stp.items()]
    lines += ["", "Head distillation computes the original's logits and the student's chain outputs through "
              "onnxruntime (`pipeline/pruning/fast_inference.py`, checked against torch on the first images) and "
              "feeds the replaced model the corner; block-wise distillation propagates its units' outputs the same way."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(text, HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
