"""`fmap profile MODEL`: the profile stage without a recipe (parse, call, render; no logic here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _calibration_split(data: str, input_shape: list[int]) -> Any:
    """An .npz file or an image folder, as the calibration split."""
    from pipeline.errors import BadInput
    from pipeline.recipe_models import ImageFolderData, NumpyData
    from pipeline.sources.data import build_split

    path = Path(data)
    if not path.exists():
        raise BadInput(f"--data '{data}': no such file or folder")
    if path.is_dir():
        cfg: Any = ImageFolderData(source="imagefolder", path=str(path), size=input_shape[-1], samples=256)
    elif path.suffix == ".npz":
        cfg = NumpyData(source="numpy", path=str(path))
    else:
        raise BadInput(f"--data '{data}': expected an .npz file or an image folder")
    return build_split(cfg, "calibration", input_shape)


@click.command("profile")
@click.argument("model_spec", metavar="MODEL")
@click.option("--input-shape", default=None, help="N,C,H,W (default: the model's, else 1,3,224,224).")
@click.option("--weights", default=None, help="Local state_dict or fmap checkpoint.")
@click.option("--data", default=None, help="An .npz file or image folder: adds per-channel redundancy statistics.")
@click.option("--max-batches", default=8, show_default=True, type=click.IntRange(min=1),
              help="Calibration batches used for statistics.")
@click.option("--out", "out_dir", default="fmap-profile", show_default=True, type=click.Path(file_okay=False),
              help="Where profile.json / profile.md (and stats.npz, plots) go.")
@click.option("--plots/--no-plots", default=False, help="Also write PNG plots into --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON on stdout.")
def profile(model_spec: str, input_shape: str | None, weights: str | None, data: str | None, max_batches: int,
            out_dir: str, plots: bool, as_json: bool) -> None:
    """Profile MODEL's feature maps: shapes, MACs, liveness peak memory (and redundancy with --data)."""
    import torch
    from rich.console import Console

    from pipeline.sources.data import DataBundle
    from pipeline.sources.models import build_model, default_input_shape, model_config_from_string, parse_shape
    from pipeline.stages.base import StageContext
    from pipeline.stages.profile import ProfileConfig, ProfileStage

    console = Console(stderr=True)
    cfg = model_config_from_string(model_spec, parse_shape(input_shape) if input_shape else None, weights)
    shape = default_input_shape(cfg)
    model = build_model(cfg, log=lambda m: console.print(m))
    bundle = DataBundle(calibration=_calibration_split(data, shape) if data else None)
    ctx = StageContext(run_dir=Path(out_dir), model=model, original_model=model, model_spec=cfg,
                       example_input=torch.randn(shape, generator=torch.Generator().manual_seed(0)),
                       data=bundle, console=console)
    result = ProfileStage().run(ctx, ProfileConfig(plots=plots, max_batches=max_batches))
    _render(console, result.metrics)
    console.print(f"wrote {', '.join(str(a.path) for a in result.artifacts.values())}")
    if as_json:
        click.echo(json.dumps(result.metrics, default=str))


def _render(console: Any, prof: dict[str, Any]) -> None:
    from rich.table import Table

    from pipeline.profiling.model_profile import LAYER_COLUMNS, layer_rows
    from pipeline.units import human_bytes

    table = Table(title="per-layer profile", show_lines=False)
    for col in LAYER_COLUMNS:
        table.add_column(col, justify="left" if col in ("layer", "type", "output") else "right")
    for row in layer_rows(prof["layers"]):
        table.add_row(*row)
    console.print(table)
    mem, tot = prof["memory"], prof["totals"]
    console.print(f"params {tot['params']:,}   MACs {tot['macs']:,}   graph: {tot['graph_method']}")
    console.print(f"[bold]liveness peak[/] {human_bytes(mem['liveness_peak_bytes'])} (batch {mem['batch_size']}, "
                  f"{human_bytes(mem['liveness_peak_per_sample_bytes'])}/sample) at [cyan]{mem['peak_at']}[/]; "
                  f"alive: {', '.join(mem['alive_at_peak'])}")
    console.print(f"[bold]measured peak[/] {human_bytes(mem['measured_peak_bytes'])} "
                  f"(incl. in-op scratch {human_bytes(mem['measured_peak_with_scratch_bytes'])})")
    console.print(f"[bold]naive sum of outputs[/] {human_bytes(mem['naive_sum_bytes'])} (what per-layer summaries "
                  f"add up; tensors are not all alive at once)")
    if prof.get("redundancy"):
        dead = sum(r["dead"] for r in prof["redundancy"].values())
        console.print(f"redundancy: {len(prof['redundancy'])} layers, {dead} dead channels")
