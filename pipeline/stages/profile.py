"""The profile stage: shapes, MACs, liveness peak memory and per-channel redundancy of ctx.model."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pipeline.atomic import write_json
from pipeline.stages.base import Artifact, Stage, StageConfig, StageContext, StageResult


class ProfileConfig(StageConfig):
    redundancy: bool = True  # per-channel statistics over data.calibration (skipped if none)
    rank: bool = True  # HRank feature-map ranks on the first `rank_samples` samples
    rank_samples: int = Field(default=64, ge=1)
    correlation: bool = True  # inter-channel correlation matrices
    batch_size: int | None = Field(default=None, gt=0)  # memory report batch; default: input_shape's
    measure: bool = True  # also measure the allocator peak with torch.profiler
    plots: bool = True
    max_batches: int | None = Field(default=None, gt=0)  # cap on calibration batches for statistics


class ProfileStage(Stage[ProfileConfig]):
    name = "profile"
    Config = ProfileConfig
    description = "Per-layer shapes, params, MACs, liveness peak memory and channel redundancy."

    def produces(self, cfg: ProfileConfig) -> tuple[str, ...]:
        return ("profile_json", "profile_md")

    def run(self, ctx: StageContext, cfg: ProfileConfig) -> StageResult:
        from pipeline.profiling.model_profile import profile_model, to_markdown
        from pipeline.sources.registry import is_editable

        ctx.console.print("[bold]profile[/]: tracing shapes and activation memory")
        editable = is_editable(ctx.model)
        if editable:
            prof = profile_model(ctx.model, ctx.example_input, batch_size=cfg.batch_size, measure=cfg.measure)
        else:  # TorchScript / torch.export / ONNX: no modules to hook, read the ONNX graph instead
            from pipeline.profiling.onnx_graph import profile_graph_module

            prof = profile_graph_module(ctx.model, ctx.example_input, cfg.batch_size, ctx.path("profile/graph_view.onnx"))
        artifacts: dict[str, Artifact] = {}
        stats = None
        prof["redundancy"] = {}
        if cfg.redundancy and not editable:
            prof["redundancy_skipped"] = ("per-channel statistics hook torch layers; this model is a compiled graph "
                                          "(profiled from its ONNX graph instead)")
        elif cfg.redundancy and ctx.data.calibration is not None:
            stats = _collect(ctx, cfg)
            from pipeline.profiling.redundancy import summarize_redundancy

            prof["redundancy"] = summarize_redundancy(stats)
            path = stats.save(ctx.path("profile/stats.npz"))
            artifacts["profile_stats"] = Artifact(path, "stats", description="per-channel activation statistics")
        elif cfg.redundancy:
            prof["redundancy_skipped"] = "no data.calibration in the recipe"
        artifacts["profile_json"] = Artifact(write_json(ctx.path("profile/profile.json"), prof), "report",
                                             description="per-layer profile")
        from pipeline.atomic import write_text

        artifacts["profile_md"] = Artifact(write_text(ctx.path("profile/profile.md"), to_markdown(prof)), "report",
                                           description="per-layer profile (Markdown)")
        if cfg.plots:
            artifacts.update(_plots(ctx, prof, stats))
        mem = prof["memory"]
        ctx.console.print(f"  liveness peak {mem['liveness_peak_bytes']:,} B at {mem['peak_at']}; "
                          f"measured {_bytes(mem['measured_peak_bytes'])}; naive sum {mem['naive_sum_bytes']:,} B")
        return StageResult(metrics=prof, artifacts=artifacts)


def _bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,} B"


def _collect(ctx: StageContext, cfg: ProfileConfig) -> Any:
    from pipeline.profiling.stats import collect_channel_stats
    from pipeline.progress import counter

    split = ctx.data.require("calibration", "profile")
    total = len(split)
    if cfg.max_batches is not None:
        total = min(total, cfg.max_batches * split.batch_size)
    with counter(ctx.console, "channel statistics", total) as advance:
        return collect_channel_stats(
            ctx.model, (x for x, _ in split.batches()), rank_samples=cfg.rank_samples if cfg.rank else 0,
            progress=advance, correlation=cfg.correlation, max_batches=cfg.max_batches)


def _plots(ctx: StageContext, prof: dict[str, Any], stats: Any) -> dict[str, Artifact]:
    from pipeline.profiling import plots
    from pipeline.profiling.redundancy import most_redundant

    out = {
        "plot_layer_memory": Artifact(plots.plot_layer_memory(prof, ctx.path("profile/layer_memory.png")), "plot",
                                      description="activation bytes per layer, peak marked"),
        "plot_memory_timeline": Artifact(plots.plot_timeline(prof, ctx.path("profile/memory_timeline.png")), "plot",
                                         description="live activation bytes along execution order"),
    }
    if prof["redundancy"]:
        out["plot_redundancy"] = Artifact(plots.plot_redundancy(prof["redundancy"], ctx.path("profile/redundancy.png")),
                                          "plot", description="APoZ and dead channels per layer")
    layer = most_redundant(stats) if stats is not None else None
    if layer is not None:
        out["plot_correlation"] = Artifact(
            plots.plot_correlation(stats.layers[layer].corr, layer, ctx.path("profile/correlation.png")), "plot",
            description=f"channel correlation of {layer}")
    return out
