"""The `visualize` stage: feature maps, Grad-CAM, before/after-compression attention, QA gallery.

Reference is always `ctx.original_model`. Compared: `ctx.model` when compression changed it (Grad-CAM
agreement) and every ONNX artifact (feature-map agreement at layers that map back to torch modules).
`fmap visualize` calls `visualize_batch` directly with user images and nothing to compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.errors import StageFailed
from pipeline.stages.base import Artifact, GateResult, Stage, StageConfig, StageContext, StageResult

if TYPE_CHECKING:  # torch is imported inside functions so that `fmap validate` stays fast
    import torch
    from torch import nn

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
        x, y = take(ctx.data.require("eval", self.name).batches(), cfg.images)
        return visualize_batch(ctx, cfg, x, y)


def take(batches: Any, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first n samples of a stream of (x, y) batches."""
    import torch

    xs, ys, got = [], [], 0
    for bx, by in batches:
        xs.append(bx[: n - got])
        if by is not None:
            ys.append(by[: n - got])
        got += len(xs[-1])
        if got >= n:
            break
    if not xs:
        raise StageFailed("visualize: the eval split yielded no samples")
    x = torch.cat(xs).float()
    y = torch.cat(ys).long() if ys and sum(len(t) for t in ys) == len(x) else None
    return x, y


def visualize_batch(ctx: StageContext, cfg: VisualizeConfig, x: torch.Tensor, y: torch.Tensor | None,
                    names: list[str] | None = None) -> StageResult:
    """Everything the stage does, on an explicit batch (shared with the `fmap visualize` command)."""
    import torch

    from pipeline.visualize import plots
    from pipeline.visualize.featuremaps import top_channels
    from pipeline.visualize.gradcam import grad_cam

    ref = ctx.original_model
    layers, logits, acts, graph_only = _feature_maps(ctx, cfg, x)
    names = names or [str(i) for i in range(len(x))]
    probs = torch.softmax(logits.float(), 1)
    shown = x[:SHOWN_IMAGES]
    result = StageResult(metrics={"layers": {}, "images": len(x), "labelled": y is not None, "plots": {},
                                  "similarity": {}})
    m = result.metrics
    if graph_only:
        cfg = _graph_skips(ctx, cfg, m)

    def add_plot(key: str, path: Path, what: str) -> None:
        result.artifacts[key] = Artifact(path, "plot", description=what)
        m["plots"][key] = _rel(path, ctx.run_dir)

    ref_cams: dict[str, torch.Tensor] = {}
    with ctx.console.status("visualize: feature maps and Grad-CAM"):
        for layer in layers:
            act, slug = acts[layer], layer.replace(".", "_") or "root"
            top = top_channels(act, cfg.top_k)
            entry: dict[str, Any] = {"shape": list(act.shape[1:]), "top_channels": [[i, round(v, 6)] for i, v in top]}
            add_plot(f"featuremaps_{slug}", plots.feature_grid(act[0], top, ctx.path(f"{OUT}/featuremaps_{slug}.png"),
                     f"{layer}: top-{len(top)} channels by mean activation (image {names[0]})"), f"strongest channels of {layer}")
            add_plot(f"overlay_{slug}", plots.image_rows(shown, [("input", None), (f"{layer} ch {top[0][0]}", act[:SHOWN_IMAGES, top[0][0]])],
                     ctx.path(f"{OUT}/overlay_{slug}.png"), f"{layer}: strongest channel over the input"), f"overlay of {layer}")
            if cfg.gradcam:
                cams = grad_cam(ref, x, layer)
                ref_cams[layer] = cams.gradcam
                cols: list[tuple[str, Any]] = [("input", None), ("Grad-CAM pred", cams.gradcam[:SHOWN_IMAGES]),
                                               ("Grad-CAM++ pred", cams.gradcam_pp[:SHOWN_IMAGES])]
                labels = [f"pred {int(p)}" for p in cams.targets[:SHOWN_IMAGES]]
                if y is not None:
                    cols.append(("Grad-CAM true", grad_cam(ref, x, layer, targets=y).gradcam[:SHOWN_IMAGES]))
                    labels = [f"{lab} / true {int(t)}" for lab, t in zip(labels, y[:SHOWN_IMAGES])]
                add_plot(f"gradcam_{slug}", plots.image_rows(shown, cols, ctx.path(f"{OUT}/gradcam_{slug}.png"),
                         f"{layer}: Grad-CAM", labels), f"Grad-CAM of {layer}")
                entry["cam_peak_yx"] = [list(divmod(int(c.argmax()), c.shape[-1])) for c in cams.gradcam[:SHOWN_IMAGES]]
            m["layers"][layer] = entry

    preds: dict[str, torch.Tensor] = {"original": probs}
    sims: dict[str, torch.Tensor] = {}
    overlays: dict[str, torch.Tensor] = {}
    if cfg.compare:
        from pipeline.visualize.compare import compare_all

        for res in compare_all(ctx.model, ctx.artifacts, ctx.threads, ref, x, layers, acts, logits):
            if res.skipped:
                ctx.console.print(f"[yellow]visualize: {res.name}: not compared ({res.skipped})[/]")
                m["similarity"][res.name] = {"skipped": res.skipped}
                continue
            preds[res.name], sims[res.name] = res.probs, res.similarity
            if res.cams is not None:
                overlays[res.name] = res.cams
            m["similarity"][res.name] = res.summary()
            worst = m["similarity"][res.name]["worst"][:SHOWN_IMAGES]
            add_plot(f"worst_{res.name}", plots.image_rows(
                x[worst], [("input", None), ("original", res.ref_maps[worst]), (res.name, res.maps[worst])],
                ctx.path(f"{OUT}/worst_{res.name}.png"), f"{res.name}: least similar images ({res.method})",
                [f"#{i} sim {float(res.similarity[i]):.2f}" for i in worst]), f"worst images of {res.name}")
        if cfg.min_attention_similarity is not None:
            result.gates.extend(_gates(cfg.min_attention_similarity, m["similarity"]))

    from pipeline.visualize.gallery import write_gallery

    cam_layer = layers[-1] if ref_cams else None
    gallery = write_gallery(ctx.path("qa.html"), _gallery_rows(x, y, names, preds, sims, ref_cams.get(cam_layer or ""), overlays),
                            list(preds))
    result.artifacts["qa_gallery"] = Artifact(gallery, "report", description="per-image QA gallery")
    m["plots"]["qa_gallery"] = _rel(gallery, ctx.run_dir)

    if cfg.tensorboard:
        m["tensorboard"] = _tensorboard(ctx, ref, x, acts)
    if cfg.scaling:
        m["scaling"] = _scaling(ctx, ref, add_plot)
    return result


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
    return _rel(log_dir, ctx.run_dir)


def _scaling(ctx: StageContext, model: nn.Module, add_plot: Any) -> Any:
    from pipeline.visualize.scaling import plot_scaling, scaling_table, summarize_fn

    fn = summarize_fn()
    if isinstance(fn, str):
        ctx.console.print(f"[yellow]visualize: scaling plot skipped: {fn}[/]")
        return f"skipped: {fn}"
    table = scaling_table(model, ctx.example_input, fn)
    add_plot("scaling", plot_scaling(table, ctx.path(f"{OUT}/scaling.png")), "computed memory/MACs scaling")
    return table


def _rel(path: Path, run_dir: Path) -> str:
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)
