"""The `visualize` stage: feature maps, Grad-CAM, before/after-compression attention, QA gallery.

Reference is always `ctx.original_model`. Compared: `ctx.model` when compression changed it (Grad-CAM
agreement) and every ONNX artifact (feature-map agreement at layers that map back to torch modules).
`fmap visualize` calls `visualize_batch` directly with user images and nothing to compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.contracts import run_relative
from pipeline.errors import StageFailed
from pipeline.stages.base import Artifact, GateResult, Stage, StageConfig, StageContext, StageResult

if TYPE_CHECKING:  # torch is imported inside functions so that `fmap validate` stays fast
    import torch
    from torch import nn

    from pipeline.sources.data import DataSplit

SHOWN_IMAGES = 4  # rows in the per-layer and worst-image figures
OUT = "visualize"


class VisualizeConfig(StageConfig):
    layers: list[str] | None = None  # module names; default ~3 convs across depth
    images: int = Field(default=16, gt=0)  # eval images used (first N)
    top_k: int = Field(default=8, gt=0)  # channels in each feature-map grid
    gradcam: bool = True  # Grad-CAM / Grad-CAM++ figures per layer
    compare: bool = True  # before/after-compression similarity
    min_attention_similarity: float | None = Field(default=None, ge=-1.0, le=1.0)  # gate on mean similarity
    tensorboard: bool = False  # histograms + graph, if the tensorboard package is installed
    scaling: bool = True  # computed memory/MACs vs resolution and batch


class VisualizeStage(Stage[VisualizeConfig]):
    name = "visualize"
    Config = VisualizeConfig
    description = "Feature maps, Grad-CAM, compressed-vs-original attention similarity, qa.html gallery"

    def run(self, ctx: StageContext, cfg: VisualizeConfig) -> StageResult:
        x, y = _first(ctx.data.require("eval", self.name), cfg.images)
        return visualize_batch(ctx, cfg, x, y)


def _first(split: DataSplit, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first n samples of a split as one batch."""
    import torch

    xs, ys = [], []
    for bx, by in split.take(n):
        xs.append(bx)
        if by is not None:
            ys.append(by)
    if not xs:
        raise StageFailed("visualize: the eval split yielded no samples")
    x = torch.cat(xs).float()
    y = torch.cat(ys).long() if ys and sum(len(t) for t in ys) == len(x) else None
    return x, y


def visualize_batch(ctx: StageContext, cfg: VisualizeConfig, x: torch.Tensor, y: torch.Tensor | None,
                    names: list[str] | None = None) -> StageResult:
    """Everything the stage does, on an explicit batch (shared with the `fmap visualize` command)."""
    import torch

    from pipeline.visualize.gallery import write_gallery

    ref = ctx.original_model
    layers, logits, acts, graph_only = _feature_maps(ctx, cfg, x)
    names = names or [str(i) for i in range(len(x))]
    result = StageResult(metrics={"layers": {}, "images": len(x), "labelled": y is not None, "plots": {},
                                  "similarity": {}})
    m = result.metrics
    if graph_only:
        cfg = _graph_skips(ctx, cfg, m)

    def add_plot(key: str, path: Path, what: str) -> None:
        result.artifacts[key] = Artifact(path, "plot", description=what)
        m["plots"][key] = run_relative(path, ctx.run_dir)

    with ctx.console.status("visualize: feature maps and Grad-CAM"):
        ref_cams = {layer: _layer_figures(ctx, cfg, layer, acts[layer], x, y, names, add_plot, m["layers"])
                    for layer in layers}
    preds: dict[str, torch.Tensor] = {"original": torch.softmax(logits.float(), 1)}
    sims: dict[str, torch.Tensor] = {}
    overlays: dict[str, torch.Tensor] = {}
    if cfg.compare:
        _compare(ctx, x, layers, acts, logits, add_plot, m["similarity"], preds, sims, overlays)
        if cfg.min_attention_similarity is not None:
            result.gates.extend(_gates(cfg.min_attention_similarity, m["similarity"]))
    cam = ref_cams.get(layers[-1]) if cfg.gradcam and layers else None
    gallery = write_gallery(ctx.path("qa.html"), _gallery_rows(x, y, names, preds, sims, cam, overlays), list(preds))
    result.artifacts["qa_gallery"] = Artifact(gallery, "report", description="per-image QA gallery")
    m["plots"]["qa_gallery"] = run_relative(gallery, ctx.run_dir)
    if cfg.tensorboard:
        m["tensorboard"] = _tensorboard(ctx, ref, x, acts)
    if cfg.scaling:
        m["scaling"] = _scaling(ctx, ref, add_plot)
    return result


def _layer_figures(ctx: StageContext, cfg: VisualizeConfig, layer: str, act: torch.Tensor, x: torch.Tensor,
                   y: torch.Tensor | None, names: list[str], add_plot: Any, out: dict[str, Any]) -> Any:
    """Feature-map grid, overlay and (optionally) Grad-CAM figures of one layer of the original
    model; its metrics go into `out[layer]`. Returns its Grad-CAM maps (None without gradcam)."""
    from pipeline.visualize import plots
    from pipeline.visualize.featuremaps import top_channels
    from pipeline.visualize.gradcam import grad_cam

    ref, shown, slug = ctx.original_model, x[:SHOWN_IMAGES], layer.replace(".", "_") or "root"
    top = top_channels(act, cfg.top_k)
    entry: dict[str, Any] = {"shape": list(act.shape[1:]), "top_channels": [[i, round(v, 6)] for i, v in top]}
    add_plot(f"featuremaps_{slug}", plots.feature_grid(act[0], top, ctx.path(f"{OUT}/featuremaps_{slug}.png"),
             f"{layer}: top-{len(top)} channels by mean activation (image {names[0]})"), f"strongest channels of {layer}")
    add_plot(f"overlay_{slug}", plots.image_rows(shown, [("input", None), (f"{layer} ch {top[0][0]}", act[:SHOWN_IMAGES, top[0][0]])],
             ctx.path(f"{OUT}/overlay_{slug}.png"), f"{layer}: strongest channel over the input"), f"overlay of {layer}")
    out[layer] = entry
    if not cfg.gradcam:
        return None
    cams = grad_cam(ref, x, layer)
    cols: list[tuple[str, Any]] = [("input", None), ("Grad-CAM pred", cams.gradcam[:SHOWN_IMAGES]),
                                   ("Grad-CAM++ pred", cams.gradcam_pp[:SHOWN_IMAGES])]
    labels = [f"pred {int(p)}" for p in cams.targets[:SHOWN_IMAGES]]
    if y is not None:
        cols.append(("Grad-CAM true", grad_cam(ref, x, layer, targets=y).gradcam[:SHOWN_IMAGES]))
        labels = [f"{lab} / true {int(t)}" for lab, t in zip(labels, y[:SHOWN_IMAGES])]
    add_plot(f"gradcam_{slug}", plots.image_rows(shown, cols, ctx.path(f"{OUT}/gradcam_{slug}.png"),
             f"{layer}: Grad-CAM", labels), f"Grad-CAM of {layer}")
    entry["cam_peak_yx"] = [list(divmod(int(c.argmax()), c.shape[-1])) for c in cams.gradcam[:SHOWN_IMAGES]]
    return cams.gradcam


def _compare(ctx: StageContext, x: torch.Tensor, layers: list[str], acts: dict[str, torch.Tensor],
             logits: torch.Tensor, add_plot: Any, similarity: dict[str, Any], preds: dict[str, torch.Tensor],
             sims: dict[str, torch.Tensor], overlays: dict[str, torch.Tensor]) -> None:
    """Every compressed model against the original: similarity metrics, worst-image figures, and
    its predictions/similarities/attention maps for the gallery (filled into the dicts given)."""
    from pipeline.visualize import plots
    from pipeline.visualize.compare import compare_all

    for res in compare_all(ctx.model, ctx.artifacts, ctx.threads, ctx.original_model, x, layers, acts, logits):
        if res.skipped:
            ctx.console.print(f"[yellow]visualize: {res.name}: not compared ({res.skipped})[/]")
            similarity[res.name] = {"skipped": res.skipped}
            continue
        preds[res.name], sims[res.name] = res.probs, res.similarity
        if res.cams is not None:
            overlays[res.name] = res.cams
        similarity[res.name] = res.summary()
        worst = similarity[res.name]["worst"][:SHOWN_IMAGES]
        add_plot(f"worst_{res.name}", plots.image_rows(
            x[worst], [("input", None), ("original", res.ref_maps[worst]), (res.name, res.maps[worst])],
            ctx.path(f"{OUT}/worst_{res.name}.png"), f"{res.name}: least similar images ({res.method})",
            [f"#{i} sim {float(res.similarity[i]):.2f}" for i in worst]), f"worst images of {res.name}")


def _feature_maps(ctx: StageContext, cfg: VisualizeConfig, x: torch.Tensor,
                  ) -> tuple[list[str], torch.Tensor, dict[str, torch.Tensor], bool]:
    """(layers, logits, {layer: activation}, graph_only): forward hooks on a torch model; on a compiled
    graph (ONNX, TorchScript, torch.export) the Conv outputs of its ONNX graph, read by onnxruntime."""
    from pipeline.sources.registry import is_editable

    ref = ctx.original_model
    if is_editable(ref):
        from pipeline.visualize.featuremaps import capture, resolve_layers

        layers = resolve_layers(ref, cfg.layers)
        return (layers, *capture(ref, x, layers), False)
    from pipeline.visualize import graph_maps

    path = graph_maps.graph_file(ref, ctx.example_input, ctx.path(f"{OUT}/graph_view.onnx"))
    layers = graph_maps.resolve_layers(path, cfg.layers)
    return (layers, *graph_maps.capture(path, x, layers, ctx.threads), True)


def _graph_skips(ctx: StageContext, cfg: VisualizeConfig, m: dict[str, Any]) -> VisualizeConfig:
    """What a compiled graph cannot show, each skip with its reason in the metrics; the config without them."""
    from pipeline.visualize.graph_maps import GRADCAM_SKIPPED

    m["graph"] = "onnx"
    if cfg.gradcam:
        ctx.console.print(f"[yellow]visualize: Grad-CAM skipped: {GRADCAM_SKIPPED}[/]", soft_wrap=True)
        m["gradcam"] = f"skipped: {GRADCAM_SKIPPED}"
    if cfg.scaling:  # the profile stage reports the graph's memory and MACs at the recipe's shape
        m["scaling"] = "skipped: the scaling plot re-traces torch modules; a compiled graph has none"
    if cfg.tensorboard:
        m["tensorboard"] = "skipped: the TensorBoard graph is traced from torch modules"
    return cfg.model_copy(update={"gradcam": False, "tensorboard": False, "scaling": False})


def _gates(threshold: float, similarity: dict[str, dict[str, Any]]) -> list[GateResult]:
    gates = []
    for name, s in similarity.items():
        if "mean" not in s:
            gates.append(GateResult("min_attention_similarity", threshold, None, True, name,
                                    f"not measurable: {s.get('skipped')}"))
        else:
            ok = s["mean"] >= threshold
            gates.append(GateResult("min_attention_similarity", threshold, s["mean"], ok, name,
                                    f"mean {s['method']} similarity {s['mean']:.3f} {'>=' if ok else '<'} {threshold}"))
    if not gates:
        gates.append(GateResult("min_attention_similarity", threshold, None, True, None, "no compressed model to compare"))
    return gates


def _gallery_rows(x: torch.Tensor, y: torch.Tensor | None, names: list[str], preds: dict[str, torch.Tensor],
                  sims: dict[str, torch.Tensor], ref_cam: torch.Tensor | None,
                  overlays: dict[str, torch.Tensor]) -> list[Any]:
    from pipeline.visualize.gallery import GalleryRow
    from pipeline.visualize.plots import heat_overlay, thumbnail_b64, to_display

    rows = []
    for i in range(len(x)):
        thumbs = [("input", thumbnail_b64(_rgb(to_display(x[i]))))]
        if ref_cam is not None:
            thumbs.append(("original CAM", thumbnail_b64(heat_overlay(x[i], ref_cam[i].numpy()))))
        for name, cam in overlays.items():
            thumbs.append((f"{name} CAM", thumbnail_b64(heat_overlay(x[i], cam[i].numpy()))))
        p = {a: (int(v[i].argmax()), float(v[i].max())) for a, v in preds.items()}
        rows.append(GalleryRow(i, names[i], None if y is None else int(y[i]), thumbs, p,
                               {a: float(s[i]) for a, s in sims.items()}))
    return rows


def _rgb(a: Any) -> Any:
    import numpy as np

    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a


def _tensorboard(ctx: StageContext, model: nn.Module, x: torch.Tensor, acts: dict[str, torch.Tensor]) -> str:
    from pipeline.visualize.tensorboard import export_tensorboard, tensorboard_unavailable

    reason = tensorboard_unavailable()
    if reason:
        ctx.console.print(f"[yellow]visualize: tensorboard export skipped: {reason}[/]")
        return f"skipped: {reason}"
    log_dir = export_tensorboard(ctx.path(f"{OUT}/tensorboard/.keep").parent, model, x, acts)
    return run_relative(log_dir, ctx.run_dir)


def _scaling(ctx: StageContext, model: nn.Module, add_plot: Any) -> Any:
    from pipeline.visualize.scaling import plot_scaling, scaling_table

    table = scaling_table(model, ctx.example_input)
    add_plot("scaling", plot_scaling(table, ctx.path(f"{OUT}/scaling.png")), "computed memory/MACs scaling")
    return table

