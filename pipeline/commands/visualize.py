"""`fmap visualize MODEL --images PATH`: feature maps, Grad-CAM and a QA gallery without a recipe.

Thin: parse options, load the model and images, call the visualize stage's `visualize_batch`, print
where the pictures are. Errors the user can fix exit 2 with one line, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


def _normalisation(source: str, mode: str) -> tuple[list[float] | None, list[float] | None]:
    """mean/std for `mode`; 'auto' = ImageNet for torchvision, the digits stats for builtin:digits_cnn."""
    from pipeline.visualize.images import IMAGENET_MEAN, IMAGENET_STD

    if mode == "auto":
        if source.startswith("torchvision:"):
            mode = "imagenet"
        elif source.startswith("builtin:digits"):
            from pipeline.sources.builtin import DIGITS_MEAN, DIGITS_STD

            return [DIGITS_MEAN], [DIGITS_STD]
        else:
            mode = "none"
    return (IMAGENET_MEAN, IMAGENET_STD) if mode == "imagenet" else (None, None)


BUILTIN_IMAGES = "builtin:digits"


@click.command("visualize")
@click.argument("model")
@click.option("--images", "images_path", required=True, type=click.Path(path_type=Path),
              help="An image file, a folder of images, an .npz with x (and optional y labels), "
                   "or builtin:digits (the embedded digits test split).")
@click.option("--layers", multiple=True, help="Module names to show (repeat or comma-separate); default ~3 convs.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder (default runs/visualize-<model>).")
@click.option("--input-shape", default=None, help="N,C,H,W such as 1,3,224,224 (default: the model's).")
@click.option("--weights", default=None, help="Local state_dict or fmap checkpoint.")
@click.option("--max-images", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--top-k", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--normalize", type=click.Choice(["auto", "imagenet", "none"]), default="auto", show_default=True,
              help="Input normalisation after scaling pixels to [0, 1].")
@click.option("--no-gradcam", is_flag=True, help="Skip Grad-CAM figures.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON on stdout.")
def visualize(model: str, images_path: Path, layers: tuple[str, ...], out_dir: Path | None, input_shape: str | None,
              weights: str | None, max_images: int, top_k: int, normalize: str, no_gradcam: bool, as_json: bool) -> None:
    """Feature maps, Grad-CAM and qa.html for MODEL on your images."""
    from pipeline.errors import FmapError

    try:
        metrics, out = _run(model, images_path, [p for item in layers for p in item.split(",") if p], out_dir,
                            input_shape, weights, max_images, top_k, normalize, not no_gradcam)
    except FmapError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    if as_json:
        import json

        click.echo(json.dumps(metrics, indent=2))
    else:
        click.echo(f"{metrics['images']} images, layers {', '.join(metrics['layers'])}", err=True)
        click.echo(f"gallery: {out / 'qa.html'}", err=True)
        click.echo(f"plots:   {out / 'visualize'}", err=True)


def _run(spec: str, images_path: Path, layers: list[str], out_dir: Path | None, input_shape: str | None,
         weights: str | None, max_images: int, top_k: int, normalize: str, gradcam: bool) -> tuple[dict, Path]:
    import torch
    from rich.console import Console

    from pipeline.atomic import write_json
    from pipeline.sources.data import DataBundle, TensorSplit
    from pipeline.sources.models import build_model, default_input_shape, model_config_from_string, parse_shape
    from pipeline.stages.base import StageContext
    from pipeline.stages.visualize import VisualizeConfig, visualize_batch
    from pipeline.visualize.images import load_images

    console = Console(stderr=True)
    cfg = model_config_from_string(spec, input_shape=parse_shape(input_shape) if input_shape else None, weights=weights)
    shape = default_input_shape(cfg)
    mean, std = _normalisation(cfg.source, normalize)
    if str(images_path) == BUILTIN_IMAGES:  # the embedded digits test split, normalised as the builtin expects
        from pipeline.sources.builtin import digits_splits

        x, y = digits_splits()["test"]
        x, y = x[:max_images], y[:max_images]
        names = [f"digits[{i}]" for i in range(len(x))]
        if list(x.shape[1:]) != list(shape[1:]):
            from pipeline.errors import BadInput

            raise BadInput(f"--images {BUILTIN_IMAGES} holds {'x'.join(map(str, x.shape[1:]))} digits, but '{spec}' "
                           f"takes {'x'.join(map(str, shape[1:]))} inputs; pass a folder or .npz of its own images")
    else:
        x, y, names = load_images(images_path, shape, mean, std, limit=max_images)
    net = build_model(cfg, log=lambda msg: console.print(msg))
    out = out_dir or Path("runs") / f"visualize-{spec.replace(':', '-').replace('/', '-')}"
    ctx = StageContext(run_dir=out, model=net, original_model=net, model_spec=cfg,
                       example_input=torch.zeros(shape), data=DataBundle(eval=TensorSplit("images", x, y)),
                       console=console)
    vcfg = VisualizeConfig(layers=layers or None, images=max_images, top_k=top_k, gradcam=gradcam, compare=False)
    result = visualize_batch(ctx, vcfg, x, y, names)
    write_json(ctx.path("visualize.json"), result.metrics)
    return result.metrics, out
