"""The prune stage: structured channel pruning to a MACs/params/peak-memory/ratio target.

Ranks channels with a criterion (activation statistics from the profile stage, or torch-pruning's
magnitude/Taylor/BN-scale baselines), lets torch-pruning's DepGraph remove them consistently
across residual adds, concats and grouped convs, optionally fine-tunes with distillation, and
saves a portable checkpoint. `ctx.model` is replaced by the pruned copy; `ctx.original_model`
stays untouched as the reference.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field, model_validator

from pipeline.errors import BadInput, StageFailed
from pipeline.pruning.augment import AugmentConfig
from pipeline.pruning.importance import NEEDS_STATS, CriterionName
from pipeline.stages.base import Artifact, Stage, StageConfig, StageContext, StageResult

# calibration images the least-squares reconstruction fits on: 64 let the classifier fit them and
# generalise worse (EfficientNet-Lite0 -30% MACs: 62.5% vs 68.2% agreement on other crops); peak
# memory grows with it (one pass of the pruned model over all of them: ~2 GB for Lite0 at 224 px)
RECONSTRUCT_IMAGES = 128

Target = Literal["ratio", "macs", "params", "peak_memory"]


class FinetuneConfig(StageConfig):
    """Recovery training on data.train (labelled or not), distilled from the original model.

    The budget is `epochs`, or `steps` / `minutes` when given (the first to run out ends training).
    Model selection and early stopping use agreement/KL with the teacher on a held-out part of
    data.train (`holdout`), accuracy when it has labels; the un-fine-tuned model is candidate zero.
    """

    epochs: int = Field(3, ge=1)
    steps: int | None = Field(None, ge=1)
    minutes: float | None = Field(None, gt=0)
    lr: float = Field(0.01, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    schedule: Literal["cosine", "none"] = "cosine"
    warmup: float = Field(0.05, ge=0, lt=1)  # fraction of the budget with a linear lr warm-up
    distill: bool = True
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the distillation term
    # evaluations without improvement before stopping; null (default): use the whole budget and keep
    # the best evaluation (a small held-out set is noisy: 4 evaluations cut a 9-minute Lite0 run at 2)
    patience: int | None = Field(None, ge=1)
    eval_every: int | None = Field(None, ge=1)  # steps between evaluations; default once per epoch
    holdout: float = Field(0.1, gt=0, lt=1)  # fraction of data.train held out for selection (max 512)
    augment: AugmentConfig | None = None  # {crop_scale, flip, color_jitter}; none = no augmentation
    feature_layers: list[str] = Field(default_factory=list)  # intermediate layers to distil (1x1 adapters)
    feature_weight: float = Field(1.0, gt=0)
    # keep BatchNorm running statistics while training (batches of a few photos can be a worse estimate
    # than the original training set's); off by default: where pruning left the statistics wrong the
    # fine-tune must move them (the quickstart diverged with them frozen)
    freeze_bn: bool = False


class HeadConfig(StageConfig):
    """Head distillation after block-wise distillation (pipeline/pruning/head.py): the layers after the
    chain are trained against the original's logits (KL divergence) on the student chain's outputs,
    computed once per image, so it can use many more images than the blocks."""

    epochs: float = Field(10.0, gt=0)  # passes over the images
    lr: float = Field(0.0003, gt=0)  # Adam, cosine decay
    batch_size: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    images: int = Field(4096, ge=1)  # at most this many images of data.train (data.calibration without it)
    # wall-clock budget of the step, its targets included (null: epochs only); the first to end wins
    minutes: float | None = Field(None, gt=0)
    # views added until `images` when the split has fewer (null: only the images there are)
    augment: AugmentConfig | None = None


class BlockwiseConfig(StageConfig):
    """Block-wise distillation after pruning (pipeline/pruning/blockwise.py): each block of the model's
    residual chain is trained, in order, to reproduce the original block's feature map; the layers
    after the chain are then refitted by least squares and trained against the original's logits
    (`head`). Images: data.train (data.calibration without it)."""

    epochs: float = Field(14.0, gt=0)  # passes over the images, per block
    lr: float = Field(0.001, gt=0)  # Adam, cosine decay per block
    batch_size: int = Field(32, ge=1)
    images: int = Field(1024, ge=1)  # at most this many images (held in memory with their feature maps)
    # wall-clock budget of all blocks (null: epochs only): equal shares of what is left per unit, each
    # unit ending at its share or its epochs, whichever comes first; the head is not part of it
    minutes: float | None = Field(None, gt=0)
    head: HeadConfig | None = HeadConfig()  # null: the least-squares refit only


class PruneConfig(StageConfig):
    """`target` says what `amount` removes: a channel ratio, or a fraction of MACs/params/peak.

    Shorthand: `{macs: 0.5}` means `{target: macs, amount: 0.5}` (likewise ratio/params/peak_memory).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # what is removed: channels of every layer (torch-pruning DepGraph), or whole residual blocks
    # (pipeline/pruning/depth.py: the blocks whose removal moves the output distribution least go first)
    structure: Literal["channels", "blocks"] = "channels"
    criterion: CriterionName = "activation"  # a registered criterion (pipeline.pruning.importance)
    target: Target = "macs"
    amount: float = Field(0.5, gt=0, lt=1)
    global_pruning: bool = Field(False, alias="global")
    ignore: list[str] = Field(default_factory=list)
    round_to: int | None = Field(None, ge=1)
    iterative_steps: int = Field(1, ge=1)
    correlation_aware: bool = False
    tolerance: float = Field(0.02, gt=0, lt=0.5)  # accepted |reduction - amount| for cost targets
    # least-squares refit of the 1x1 conv / Linear layers that lost inputs, on calibration images
    reconstruct: bool = True
    # recompute BatchNorm running stats on calibration images after pruning; null: always without
    # reconstruct, after it only when that raises agreement on calibration images it did not fit on
    bn_reestimate: bool | None = None
    rounds: int = Field(1, ge=1, le=10)  # prune/recover rounds towards the target (each: prune, recover)
    allocation: Literal["uniform", "sensitivity"] = "uniform"  # per-layer ratios: same, or by measured damage
    sensitivity_probe: float = Field(0.3, gt=0, lt=1)  # fraction of a group's channels masked per probe
    compare_allocations: bool = False  # also prune with uniform and global ranking, report agreement of each
    blockwise: BlockwiseConfig | None = None  # block-wise distillation before the fine-tune
    finetune: FinetuneConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        given = [k for k in ("ratio", "macs", "params", "peak_memory") if k in data]
        if not given:
            return data
        if len(given) > 1 or "amount" in data or "target" in data:
            raise ValueError(f"give either 'target' + 'amount' or one of ratio/macs/params/peak_memory, not {given}")
        data = dict(data)
        data["target"], data["amount"] = given[0], data.pop(given[0])
        return data

    @model_validator(mode="after")
    def _one_allocation(self) -> PruneConfig:
        if self.allocation == "sensitivity" and self.global_pruning:
            raise ValueError("allocation 'sensitivity' sets per-layer ratios; it cannot be combined with global: true")
        if self.structure == "blocks":
            channel_only = [k for k, bad in (("global", self.global_pruning), ("allocation", self.allocation != "uniform"),
                                             ("compare_allocations", self.compare_allocations), ("rounds", self.rounds > 1),
                                             ("target", self.target == "ratio")) if bad]
            if channel_only:
                raise ValueError(f"structure 'blocks' drops whole blocks; {channel_only[0]!r} applies to "
                                 f"structure 'channels' only")
        return self


class PruneStage(Stage[PruneConfig]):
    name = "prune"
    Config = PruneConfig
    description = "structured channel pruning (torch-pruning DepGraph) to a MACs/params/memory target"

    def produces(self, cfg: PruneConfig) -> tuple[str, ...]:
        return ("pruned_checkpoint",)

    def check_model(self, cfg: PruneConfig, model: Any) -> None:
        from pipeline.pruning.engine import check_layer_names

        check_layer_names(model, cfg.ignore, "prune.ignore")
        if cfg.finetune is not None:
            check_layer_names(model, cfg.finetune.feature_layers, "prune.finetune.feature_layers")

    def run(self, ctx: StageContext, cfg: PruneConfig) -> StageResult:
        from pipeline.pruning.checkpoint import save_checkpoint
        from pipeline.pruning.finetune import accuracy
        from pipeline.pruning.measure import layer_costs, model_cost
        from pipeline.pruning.plot import plot_channels

        model, example = ctx.model.eval(), ctx.example_input
        before_cost, before_layers = model_cost(model, example), layer_costs(model, example)
        acc_before = accuracy(model, ctx.data.eval)
        reference = _agreement_reference(ctx, ctx.original_model)
        pruned, rounds = model, []
        for k in range(1, cfg.rounds + 1):
            pruned, row = _one_round(ctx, cfg, pruned, k, reference, rounds[-1] if rounds else None)
            rounds.append(row)
        _check_forward(model, pruned, example)
        pruned.eval()
        after_cost, after_layers = model_cost(pruned, example), layer_costs(pruned, example)
        layers = [{"name": n, "channels_before": b["channels"],
                   "channels_after": after_layers.get(n, b)["channels"], "macs_before": b["macs"],
                   "macs_after": after_layers.get(n, b)["macs"], "params_before": b["params"],
                   "params_after": after_layers.get(n, b)["params"]} for n, b in before_layers.items()]
        last = rounds[-1]
        metrics: dict[str, Any] = {
            "criterion": cfg.criterion, "target": cfg.target, "amount": cfg.amount,
            "ratio": last["ratio"], "target_reached": last["target_reached"],
            "search": [t for r in rounds for t in r["search"]],
            "before": before_cost, "after": after_cost,
            "reduction": {k: (None if not before_cost[k] or after_cost[k] is None
                              else round(1 - after_cost[k] / before_cost[k], 4)) for k in before_cost},
            "layers": layers, "left_alone": last["left_alone"],
            "accuracy": {"before": acc_before, "after_prune": rounds[0]["accuracy_after_prune"],
                         "after_finetune": last["accuracy_after_finetune"]},
            "agreement": {**{k: rounds[0]["agreement"][k] for k in ("after_prune", "after_reconstruct", "after_bn",
                                                                     "after_blockwise")},
                          "after_finetune": last["agreement"]["after_finetune"],
                          "source": None if reference is None else reference.source,
                          "samples": None if reference is None else len(reference)},
            "reconstruct": rounds[0]["reconstruct"], "batchnorm": rounds[0]["batchnorm"],
            "finetune": last["finetune"], "rounds": _round_summary(rounds) if cfg.rounds > 1 else None,
            "allocation": cfg.allocation, "sensitivity": rounds[0]["sensitivity"],
            "allocation_comparison": rounds[0]["allocation_comparison"], "stats_source": rounds[0]["stats_source"],
            "structure": cfg.structure, "dropped_blocks": last["dropped_blocks"], "blockwise": last["blockwise"],
        }
        history = {k: metrics[k] for k in ("criterion", "target", "amount", "ratio", "before", "after")}
        base = ctx.model_spec.model_dump() if ctx.model_spec is not None else {}
        ckpt = save_checkpoint(ctx.path("pruned.pt"), pruned, base_source=base, history=history)
        plot = plot_channels(layers, ctx.path("prune_channels.png"))
        ctx.model = pruned
        return StageResult(metrics=metrics, artifacts={
            "pruned_checkpoint": Artifact(ckpt, "torch", "fp32", "pruned model (fmap checkpoint)"),
            "prune_channels": Artifact(plot, "plot", None, "channels kept per layer"),
        })

    def restore(self, ctx: StageContext, cfg: PruneConfig, result: StageResult) -> None:
        """On --resume: rebuild the pruned model from its checkpoint on a copy of the original."""
        from pipeline.pruning.checkpoint import load_checkpoint

        art = result.artifacts.get("pruned_checkpoint")
        if art is None:
            raise StageFailed("prune: cannot resume, the previous run recorded no pruned_checkpoint")
        ctx.model = load_checkpoint(art.path, copy.deepcopy(ctx.original_model)).eval()


def _round_amount(cfg: PruneConfig, k: int) -> float:
    """This round's `amount` relative to the model it starts from, so that after round k the
    original model has lost k/rounds of `cfg.amount` (same target kind)."""
    done, goal = cfg.amount * (k - 1) / cfg.rounds, cfg.amount * k / cfg.rounds
    return 1.0 - (1.0 - goal) / (1.0 - done)


def _round_finetune(f: FinetuneConfig, rounds: int) -> FinetuneConfig:
    """Each round gets its share of the fine-tune budget (epochs, steps and minutes split evenly)."""
    if rounds == 1:
        return f
    return f.model_copy(update={"epochs": max(1, -(-f.epochs // rounds)),
                                "steps": None if f.steps is None else max(1, f.steps // rounds),
                                "minutes": None if f.minutes is None else f.minutes / rounds})


def _prune_model(ctx: StageContext, cfg: PruneConfig, model: torch.nn.Module, amount: float,
                 first: bool) -> tuple[Any, dict[str, Any]]:
    """One prune search on `model` (the original in round 1, the previous round's result later)."""
    from pipeline.pruning.engine import (PruneSettings, default_protection, left_alone, prune_to_target,
                                         resolve_ignored, taylor_gradients)
    from pipeline.pruning.measure import layer_costs

    example = ctx.example_input
    ignored = resolve_ignored(model, cfg.ignore)
    if cfg.structure == "blocks":
        return _prune_blocks(ctx, cfg, model, amount, ignored)
    protect = default_protection(model, example, ignored)
    stats, stats_source = ((_channel_stats(ctx, model) if first else _fresh_stats(ctx, model))
                           if cfg.criterion in NEEDS_STATS else (None, None))
    grads = None
    if cfg.criterion == "taylor":
        cal = ctx.data.require("calibration", "prune")
        grads = taylor_gradients(model, [b for _, b in zip(range(4), cal.batches())])
    settings = PruneSettings(criterion=cfg.criterion, global_pruning=cfg.global_pruning, ignored=ignored,
                             round_to=cfg.round_to, iterative_steps=cfg.iterative_steps,
                             correlation_aware=cfg.correlation_aware)
    sensitivity = None
    if cfg.allocation == "sensitivity":
        with ctx.console.status("prune: measuring per-group sensitivity on calibration images"):
            sensitivity = _sensitivity(ctx, cfg, model, example, stats, grads, protect)
        settings = replace(settings, layer_weights=tuple((r["layer"], r["weight"]) for r in sensitivity))

    def on_trial(t: dict[str, float]) -> None:
        ctx.console.print(f"prune: ratio {t['ratio']:.3f} -> {cfg.target} reduction {t['reduction']:.3f}")

    with ctx.console.status(f"pruning ({cfg.criterion}, {cfg.target} {amount:.3f})"):
        found = prune_to_target(model, example, cfg.target, amount, settings, protect, stats, grads,
                                tolerance=cfg.tolerance, on_trial=on_trial)
    if not found.reached:
        ctx.console.print(f"[yellow]prune: {cfg.target} target {amount:.3f} not reached; "
                          f"best reduction {found.reduction:.3f} at ratio {found.ratio:.3f}")
    comparison = (_compare_allocations(ctx, cfg, model, example, settings, protect, stats, grads,
                                       _agreement_reference(ctx, ctx.original_model))
                  if cfg.compare_allocations and first else None)
    info = {"ratio": round(found.ratio, 4), "target_reached": found.reached, "search": found.trials,
            "left_alone": left_alone(layer_costs(model, example), layer_costs(found.model, example), model, protect),
            "sensitivity": sensitivity, "allocation_comparison": comparison, "stats_source": stats_source}
    return found, info


def _prune_blocks(ctx: StageContext, cfg: PruneConfig, model: torch.nn.Module, amount: float,
                  ignored: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    """Depth pruning: drop whole blocks, judged on calibration images the reconstruction will not fit."""
    from pipeline.pruning.depth import block_candidates, select_blocks
    from pipeline.pruning.engine import COST_KEY, SearchResult

    example = ctx.example_input
    if not block_candidates(model, example):
        raise BadInput("prune: structure 'blocks' found no droppable block (a child of an nn.Sequential/ModuleList "
                       "with a Conv/Linear whose output has its input's shape); use structure 'channels'")
    held = _split_for_reconstruction(ctx)[1][:64]

    def on_step(t: dict[str, Any]) -> None:
        ctx.console.print(f"prune: dropped {t['block']} -> {cfg.target} reduction {t['reduction']:.3f}; "
                          f"KL {t['kl']:.4f}, agreement {t['agreement']:.3f} on {len(held)} calibration images")

    with ctx.console.status(f"pruning blocks ({cfg.target} {amount:.3f})"):
        found = select_blocks(model, example, COST_KEY[cfg.target], amount, cfg.tolerance, held, set(ignored), on_step)
    if not found.reached:
        ctx.console.print(f"[yellow]prune: {cfg.target} target {amount:.3f} not reached by dropping every "
                          f"droppable block; reduction {found.reduction:.3f}")
    result = SearchResult(found.model, 0.0, found.reduction, found.reached, [], {})
    info = {"ratio": None, "target_reached": found.reached, "search": found.trials, "left_alone": [],
            "sensitivity": None, "allocation_comparison": None, "stats_source": None, "dropped_blocks": found.dropped}
    return result, info


def _refit_names(ctx: StageContext, pruned: torch.nn.Module, dropped: list[str]) -> list[str] | None:
    """After depth pruning: every module behind the first dropped block (its inputs changed)."""
    if not dropped:
        return None
    from pipeline.pruning.depth import execution_order, layers_after

    order = execution_order(pruned, ctx.example_input)
    first = min(dropped, key=lambda n: order.index(n) if n in order else len(order))
    return layers_after(pruned, ctx.example_input, first)


def _one_round(ctx: StageContext, cfg: PruneConfig, model: torch.nn.Module, k: int, reference: Any,
               previous: dict[str, Any] | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Prune towards round k's share of the target, then recover: reconstruct, BN, fine-tune."""
    from pipeline.pruning.finetune import accuracy

    found, row = _prune_model(ctx, cfg, model, _round_amount(cfg, k), first=k == 1)
    pruned = found.model
    kept = _compose_kept(previous["kept_out"] if previous else {}, found.kept_out)
    row.setdefault("dropped_blocks", [])
    row.update(round=k, kept_out=kept, accuracy_after_prune=accuracy(pruned, ctx.data.eval),
               agreement={"after_prune": _agree(pruned, reference), "after_reconstruct": None, "after_bn": None,
                          "after_blockwise": None, "after_finetune": None}, reconstruct=None, batchnorm=None,
               blockwise=None, finetune=None, accuracy_after_finetune=None)
    refit = _refit_names(ctx, pruned, row["dropped_blocks"])
    pruned = _recover(ctx, cfg, pruned, kept, row, refit)
    if row["reconstruct"] is not None:
        row["agreement"]["after_reconstruct"] = _agree(pruned, reference)
    if row["batchnorm"] is not None and row["batchnorm"]["applied"]:
        row["agreement"]["after_bn"] = _agree(pruned, reference)
        row["batchnorm"]["accuracy_after"] = accuracy(pruned, ctx.data.eval)
    if cfg.blockwise is not None:
        pruned, row["blockwise"] = _blockwise(ctx, cfg, pruned, kept, row["dropped_blocks"])
        row["agreement"]["after_blockwise"] = _agree(pruned, reference)
    if cfg.finetune is not None:
        row["finetune"] = _finetune(ctx, _round_finetune(cfg.finetune, cfg.rounds), ctx.original_model, pruned,
                                    reconstructed=cfg.reconstruct)
        row["accuracy_after_finetune"] = accuracy(pruned, ctx.data.eval)
        row["agreement"]["after_finetune"] = _agree(pruned, reference)
    return pruned.eval(), row


def _compose_kept(before: dict[str, list[int]], now: dict[str, list[int]]) -> dict[str, list[int]]:
    """Original output channels kept after this round, from the previous rounds' and this one's."""
    out = dict(before)
    for name, idx in now.items():
        prev = before.get(name)
        out[name] = idx if prev is None else [prev[i] for i in idx]
    return out


def _round_summary(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"round": r["round"], "ratio": r["ratio"], "agreement": r["agreement"],
             "finetune_steps": None if r["finetune"] is None else r["finetune"]["steps_run"]} for r in rounds]


def _blockwise(ctx: StageContext, cfg: PruneConfig, pruned: torch.nn.Module, kept: dict[str, list[int]],
               dropped: list[str]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Block-wise distillation of the residual chain, then a least-squares refit of the layers after it
    and their distillation against the logits (`blockwise.head`). Kept only when it raises agreement on calibration images no recovery step fitted (candidate zero)."""
    from pipeline.pruning.blockwise import BlockwiseSettings, distill_blocks, find_chain
    from pipeline.pruning.depth import block_candidates, layers_after
    from pipeline.pruning.validation import logits

    b = cfg.blockwise
    assert b is not None
    chain = find_chain(ctx.original_model, dropped or block_candidates(ctx.original_model, ctx.example_input))
    if chain is None:
        ctx.console.print("[yellow]prune: block-wise distillation skipped: no single chain of blocks in this model")
        return pruned, {"skipped": "no single chain of blocks (nn.Sequential / nn.ModuleList) in this model"}
    split = ctx.data.train if ctx.data.train is not None and len(ctx.data.train) else None
    images = _split_images(split, b.images) if split is not None else _calibration_images(ctx, b.images)
    source = "data.train" if split is not None else "data.calibration"
    fit, held = _split_for_reconstruction(ctx)
    target = logits(ctx.original_model, held).argmax(1)
    before = float((logits(pruned, held).argmax(1) == target).float().mean())
    candidate = copy.deepcopy(pruned)
    settings = BlockwiseSettings(epochs=b.epochs, lr=b.lr, batch_size=b.batch_size, seed=ctx.seed, minutes=b.minutes)
    info = distill_blocks(candidate, ctx.original_model, chain, images, settings, log=ctx.console.print)
    if info.get("trained"):
        last = f"{chain}.{len(list(candidate.get_submodule(chain).children())) - 1}"
        tail = layers_after(candidate, ctx.example_input, last)
        info["refit_after_chain"] = _reconstruct(ctx, candidate, kept, fit, names=tail)["layers"]
    if b.head is not None:
        info["head"] = _head(ctx, b.head, candidate, chain, split)
    after = float((logits(candidate, held).argmax(1) == target).float().mean())
    info.update(source=source, applied=after >= before,
                decided_on={"images": len(held), "agreement_without": round(before, 4), "agreement_with": round(after, 4)})
    ctx.console.print(f"prune: block-wise distillation {'kept' if after >= before else 'discarded'}: agreement "
                      f"{before:.3f} -> {after:.3f} on {len(held)} calibration images ({info.get('seconds', 0):.0f} s)")
    return (candidate if after >= before else pruned), info


def _head(ctx: StageContext, h: HeadConfig, candidate: torch.nn.Module, chain: str, split: Any) -> dict[str, Any]:
    """Head distillation on up to `h.images` images (topped up with augmented views if asked)."""
    from pipeline.pruning.augment import Augmenter
    from pipeline.pruning.head import HeadSettings, distill_head

    images = _split_images(split, h.images) if split is not None else _calibration_images(ctx, h.images)
    found = len(images)
    if h.augment is not None and found < h.images:
        aug, views = Augmenter(h.augment, seed=ctx.seed), [images]
        while sum(len(v) for v in views) < h.images:
            views.append(aug(images))
        images = torch.cat(views)[:h.images]
    settings = HeadSettings(epochs=h.epochs, lr=h.lr, batch_size=h.batch_size, temperature=h.temperature,
                            seed=ctx.seed, minutes=h.minutes)
    info = distill_head(candidate, ctx.original_model, chain, images, settings, log=ctx.console.print)
    return {**info, "views": len(images) - found}


def _split_images(split: Any, limit: int) -> torch.Tensor:
    """The first `limit` images of a split, as one tensor."""
    xs, n = [], 0
    for x, _ in split.batches():
        xs.append(x)
        n += len(x)
        if n >= limit:
            break
    return torch.cat(xs)[:limit]


def _reconstruct(ctx: StageContext, pruned: torch.nn.Module, kept: dict[str, list[int]],
                 images: torch.Tensor, names: list[str] | None = None) -> dict[str, Any]:
    """Least-squares refit of the layers that lost inputs (or of `names`), against the original on
    calibration images."""
    import time

    from pipeline.pruning.reconstruct import reconstruct

    start = time.monotonic()
    with ctx.console.status("prune: reconstructing the layers that lost inputs (least squares)"):
        refit = reconstruct(pruned, ctx.original_model, images, kept, seed=ctx.seed, names=names)
    return {"layers": refit, "images": len(images), "source": "data.calibration",
            "seconds": round(time.monotonic() - start, 2)}


def _fresh_stats(ctx: StageContext, model: torch.nn.Module) -> tuple[Any, str]:
    """Channel statistics of an already pruned model (later rounds): the profile's no longer fit."""
    from pipeline.profiling.stats import collect_channel_stats

    cal = ctx.data.require("calibration", "prune")
    return collect_channel_stats(model, (x for _, (x, _y) in zip(range(8), cal.batches()))), \
        "collected on calibration data (round > 1)"


def _split_for_reconstruction(ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(images the reconstruction fits on, calibration images it does not see, to judge BN
    re-estimation): up to RECONSTRUCT_IMAGES fitted, leaving at least 64 unseen where there are
    128+; with fewer, both are all of them."""
    images = _calibration_images(ctx, RECONSTRUCT_IMAGES + 256)
    n = min(len(images), RECONSTRUCT_IMAGES + 64)
    fitted = RECONSTRUCT_IMAGES if n >= RECONSTRUCT_IMAGES + 64 else (n - 64 if n >= 128 else n)
    return images[:fitted], (images[fitted:] if fitted < len(images) else images)


def _calibration_images(ctx: StageContext, limit: int) -> torch.Tensor:
    return _split_images(ctx.data.require("calibration", "prune"), limit)


def _sensitivity(ctx: StageContext, cfg: PruneConfig, model: torch.nn.Module, example: torch.Tensor, stats: Any,
                 grads: Any, protect: Any) -> list[dict[str, Any]]:
    """Per-group damage rows with the allocation weight each gets."""
    import torch_pruning as tp

    from pipeline.pruning.importance import make_importance
    from pipeline.pruning.sensitivity import allocation_weights, measure_sensitivity

    def importance(work: torch.nn.Module) -> Any:
        if cfg.criterion == "taylor":  # gradients belong to the original parameters; rank by L2 here
            return tp.importance.MagnitudeImportance(p=2)
        return make_importance(cfg.criterion, work, stats, cfg.correlation_aware)

    rows = measure_sensitivity(model, example, _calibration_images(ctx, 64), importance,
                               [*cfg.ignore, *protect.reasons], probe=cfg.sensitivity_probe, round_to=cfg.round_to)
    weights = allocation_weights(rows)
    return [{**r, "weight": weights.get(r["layer"], 1.0)} for r in rows]


def _compare_allocations(ctx: StageContext, cfg: PruneConfig, model: torch.nn.Module, example: torch.Tensor,
                         settings: Any, protect: Any, stats: Any, grads: Any, reference: Any) -> list[dict[str, Any]]:
    """The same target pruned with uniform ratios and torch-pruning's global ranking (and the chosen
    allocation), each scored by agreement right after pruning and after BN re-estimation."""
    from pipeline.pruning.batchnorm import reestimate_batchnorm
    from pipeline.pruning.engine import prune_to_target

    variants = {"uniform": replace(settings, layer_weights=(), global_pruning=False),
                "global": replace(settings, layer_weights=(), global_pruning=True)}
    if settings.layer_weights:
        variants["sensitivity"] = settings
    cal = _calibration_images(ctx, 256)
    rows = []
    for label, s in variants.items():
        found = prune_to_target(model, example, cfg.target, cfg.amount, s, copy.deepcopy(protect), stats, grads,
                                tolerance=cfg.tolerance)
        row = {"allocation": label, "ratio": round(found.ratio, 4), "reduction": round(found.reduction, 4),
               "agreement_after_prune": _agree(found.model, reference)}
        reestimate_batchnorm(found.model, (cal[i:i + 32] for i in range(0, len(cal), 32)))
        row["agreement_after_bn"] = _agree(found.model, reference)
        rows.append(row)
    return rows


def _agreement_reference(ctx: StageContext, model: torch.nn.Module) -> Any:
    """Teacher logits on up to 512 eval images (calibration when there is no eval split), for reporting."""
    from pipeline.pruning.validation import Reference

    for name in ("eval", "calibration"):
        split = getattr(ctx.data, name)
        if split is not None and len(split):
            return Reference.build(model, split, f"data.{name}")
    return None


def _agree(model: torch.nn.Module, reference: Any) -> float | None:
    from pipeline.pruning.validation import score

    return None if reference is None else score(model, reference)["agreement"]


def _recover(ctx: StageContext, cfg: PruneConfig, pruned: torch.nn.Module, kept: dict[str, list[int]],
             row: dict[str, Any], names: list[str] | None = None) -> torch.nn.Module:
    """Recovery without training: BN re-estimation (when on), then reconstruction against the new
    statistics. With `bn_reestimate: null` and both possible, both orders' candidates are built and
    the one agreeing more with the original on calibration images the reconstruction did not fit on
    is kept (EfficientNet-Lite0 keeps its original statistics; the quickstart's DigitsCNN needs fresh ones)."""
    with_bn = cfg.bn_reestimate is not False and _has_bn(pruned)
    if not cfg.reconstruct or not with_bn or cfg.bn_reestimate:
        if with_bn:
            row["batchnorm"] = {**_reestimate_bn(ctx, pruned), "applied": True, "decided_on": None}
        if cfg.reconstruct:
            row["reconstruct"] = _reconstruct(ctx, pruned, kept, _split_for_reconstruction(ctx)[0], names)
        return pruned
    fit, held = _split_for_reconstruction(ctx)
    candidate = copy.deepcopy(pruned)
    bn = _reestimate_bn(ctx, candidate)
    rec_bn = _reconstruct(ctx, candidate, kept, fit, names)
    rec_only = _reconstruct(ctx, pruned, kept, fit, names)
    from pipeline.pruning.validation import logits

    target = logits(ctx.original_model, held).argmax(1)
    without, with_ = (float((logits(m, held).argmax(1) == target).float().mean()) for m in (pruned, candidate))
    row["batchnorm"] = {**bn, "applied": with_ > without, "order": "before reconstruction",
                        "decided_on": {"images": len(held), "agreement_without": round(without, 4),
                                       "agreement_with": round(with_, 4)}}
    row["reconstruct"] = rec_bn if with_ > without else rec_only
    return candidate if with_ > without else pruned


def _has_bn(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _reestimate_bn(ctx: StageContext, pruned: torch.nn.Module, max_batches: int = 16) -> dict[str, Any]:
    """Recompute BatchNorm running statistics of the pruned model on calibration images."""
    from pipeline.pruning.batchnorm import reestimate_batchnorm

    cal = ctx.data.require("calibration", "prune (bn_reestimate)")
    images = reestimate_batchnorm(pruned, (x for _, (x, _y) in zip(range(max_batches), cal.batches())))
    return {"images": images, "source": "data.calibration"}


def _finetune(ctx: StageContext, f: FinetuneConfig, teacher: torch.nn.Module, pruned: torch.nn.Module,
              reconstructed: bool = False) -> dict[str, Any]:
    """Fine-tune on data.train with a held-out part of it (or data.calibration) for model selection."""
    from pipeline.pruning import distributed
    from pipeline.pruning.finetune import FinetuneSettings, finetune
    from pipeline.pruning.validation import Reference, split_holdout

    train = ctx.data.require("train", "prune (finetune)")
    if len(train) == 0:
        raise BadInput("prune.finetune: data.train has no images")
    x0 = train.first_batch()[0]
    try:
        with torch.no_grad():
            teacher.eval()(x0[:1])
    except Exception as exc:  # noqa: BLE001 - any failure means the shapes do not fit the model
        raise BadInput(f"prune.finetune: the model cannot run on data.train images of shape "
                       f"{list(x0.shape[1:])} ({type(exc).__name__})") from None
    parts = split_holdout(train, f.holdout, seed=ctx.seed)
    if parts is not None:
        train, held = parts
        ref = Reference.build(teacher, held, f"data.train (held-out {len(held)})")
        if reconstructed:  # images the reconstruction fitted would favour candidate zero
            ref = ref.excluding(_calibration_images(ctx, RECONSTRUCT_IMAGES), "the reconstruction's images")
    elif ctx.data.calibration is not None:
        ref = Reference.build(teacher, ctx.data.calibration, "data.calibration")
    else:
        ref = None
    settings = FinetuneSettings(
        epochs=f.epochs, steps=f.steps, minutes=f.minutes, lr=f.lr, optimizer=f.optimizer, schedule=f.schedule,
        warmup=f.warmup, distill=f.distill, temperature=f.temperature, alpha=f.alpha, patience=f.patience,
        eval_every=f.eval_every, augment=f.augment, feature_layers=tuple(f.feature_layers),
        feature_weight=f.feature_weight, seed=ctx.seed, freeze_bn=f.freeze_bn)
    # data-parallel under `fmap run --nproc N` / torchrun, else a plain call (pruning/distributed.py)
    return distributed.train(finetune, pruned, teacher, train, ref, settings, console=ctx.console)


def _check_forward(original: torch.nn.Module, pruned: torch.nn.Module, example: torch.Tensor) -> None:
    from pipeline.pruning.engine import _first_tensor

    with torch.no_grad():
        a, b = _first_tensor(original(example[:1])), _first_tensor(pruned.eval()(example[:1]))
    if a is not None and (b is None or a.shape != b.shape):
        raise StageFailed(f"pruned model output shape {None if b is None else tuple(b.shape)} "
                          f"differs from the original {tuple(a.shape)}")


def _channel_stats(ctx: StageContext, model: torch.nn.Module) -> tuple[Any, str]:
    """The profile stage's statistics if they describe this model, else collect them on calibration data."""
    from pipeline.profiling.stats import ChannelStats

    names = {n for n, _ in model.named_modules()}
    art = ctx.artifacts.get("profile_stats")
    if art is not None:
        try:
            stats = ChannelStats.load(art.path)
            if stats.layers and set(stats.layers) <= names:
                return stats, "profile_stats"
        except (NotImplementedError, OSError, ValueError, KeyError):
            pass
    from pipeline.profiling.stats import collect_channel_stats

    cal = ctx.data.require("calibration", "prune")
    stats = collect_channel_stats(model, (x for _, (x, _y) in zip(range(8), cal.batches())))
    src = "collected on calibration data"
    if not stats.layers:
        raise BadInput("prune: no Conv2d/Linear layer statistics could be collected for this model")
    return stats, src
