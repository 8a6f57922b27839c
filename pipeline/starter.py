"""The commented starter recipe written by `fmap init`: one that runs to completion as written.

What it writes follows from the model and the data it is given:
- input shape: the recipe can only be right if it matches the model, so it comes from the source
  (builtin, timm config, ONNX input, exported program), else from the first image of `--data`;
- data: `--data DIR` with class subfolders is divided with `split:` (disjoint, stratified); no data
  means seeded random inputs;
- gates: labels allow an accuracy gate; without labels only agreement with the original is
  measurable, so that is the gate (an accuracy gate would fail after the whole run);
- stages: prune only for models whose layers fmap can edit, and only where its accuracy can be
  recovered (the builtin ships a train split); otherwise it is left as a commented example.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import BadInput
from pipeline.sources.data import IMAGE_EXTENSIONS

HEADER = """\
# fmap recipe: edit, then `fmap validate {file} --build` and `fmap run {file}`.
# Reference: docs/recipe.md (every key, its default, and what each stage writes).
name: {name}
seed: 0
threads: 2                     # intra-op threads for torch, onnxruntime and OpenVINO

model:
  source: {source}
  # weights: path/to/weights.pth   # local state_dict (loaded with weights_only=True) or an fmap checkpoint
  input_shape: {shape}  # {shape_origin}

data:
{data}
stages:
  - profile: {{}}                # per-layer feature maps, liveness peak memory, channel redundancy
{prune}  - export: {{}}                 # FP32 ONNX, checked for equivalence with the model
  - quantize:
      mode: static             # static | dynamic | fp16
      fallback: {{{fallback}}}  # keep the worst layers in float until this holds
  - verify:
      backends: [torch, onnxruntime]
      gates:
        {gate}
"""

PRUNE = """\
  - prune:                     # structured channel pruning (torch-pruning's dependency graph)
      criterion: activation    # activation | apoz | l1 | l2 | taylor | bn_scale
      target: macs             # ratio | macs | params | peak_memory
      amount: 0.3              # remove 30% of the MACs
      finetune: {epochs: 2}    # recover accuracy on data.train
"""

PRUNE_COMMENTED = """\
  # - prune: {{criterion: activation, target: macs, amount: 0.3, finetune: {{epochs: 3}}}}
  #   {why}
"""

BUILTIN_DATA = """\
  calibration: {source: builtin, split: calibration}
  eval: {source: builtin, split: test}
  train: {source: builtin, split: train}
"""

RANDOM_DATA = """\
  # No labelled data given (`fmap init --data DIR` adds it): random inputs measure agreement and latency.
  # Replace with your images: {source: imagefolder, path: data/val, transform: imagenet}
  calibration: {source: random, samples: 64}
  eval: {source: random, samples: 64}
"""

FOLDER_DATA = """\
  # One labelled folder ({classes} classes, {images} images), divided into disjoint, stratified parts.
  calibration: &images {{source: imagefolder, path: {path}, transform: {transform}, split: {{calibration: 0.3, eval: 0.7}}}}
  eval: *images
"""


def first_image(folder: Path) -> Path | None:
    for f in sorted(folder.rglob("*")):
        if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
            return f
    return None


def _folder(data_dir: str) -> tuple[list[str], int, Path]:
    root = Path(data_dir)
    if not root.is_dir():
        raise BadInput(f"--data '{data_dir}': no such folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise BadInput(f"--data '{data_dir}': expected a labelled folder DIR/<class>/<image> with two or more "
                       f"classes, found {len(classes)}")
    images = [f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS]
    first = first_image(root)
    if first is None or len(images) < 4:
        raise BadInput(f"--data '{data_dir}': found {len(images)} images; need a few per class")
    return classes, len(images), first


def _image_shape(path: Path) -> list[int]:
    from PIL import Image

    with Image.open(path) as im:
        channels = 1 if im.mode in ("1", "L", "I", "I;16", "F") else 3
        return [1, channels, min(im.size), min(im.size)]


def starter_recipe(model_spec: str, data_dir: str | None = None, file: str = "recipe.yaml") -> str:
    from pipeline.sources.models import DEFAULT_INPUT_SHAPE, default_input_shape, model_config_from_string
    from pipeline.sources.registry import get_source

    from pipeline.sources.models import build_model

    cfg = model_config_from_string(model_spec)
    source, rest = get_source(cfg.source)
    build_model(cfg)  # a recipe for a model that does not build would fail only at `fmap run`
    folder = _folder(data_dir) if data_dir else None
    shape = default_input_shape(cfg)
    known = source.input_shape is not None and source.input_shape(rest, dict(cfg.kwargs), _ctx()) is not None
    origin = f"from the {source.kind}"  # builtin table, timm config, ONNX input, exported program
    if not known and folder is not None:
        shape, origin = _image_shape(folder[2]), f"from {folder[2].name}, the first image of --data"
    elif not known:
        origin = "a guess: set it to what the model expects"
        shape = list(DEFAULT_INPUT_SHAPE)
    stem = Path(rest).stem if source.prefix in ("onnx", "torchscript", "exported") else rest.split(":")[-1]
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip("-._") or "model"
    builtin = cfg.source == "builtin:digits_cnn"  # the one model whose data ships with fmap, labelled
    if builtin:
        data, labelled = BUILTIN_DATA, True
    elif folder is not None:
        transform = "imagenet" if shape[-1] >= 64 else "none"
        data = FOLDER_DATA.format(classes=len(folder[0]), images=folder[1], path=data_dir, transform=transform)
        labelled = True
    else:
        data, labelled = RANDOM_DATA, False
    if builtin:
        prune = PRUNE
    elif not source.editable:
        prune = PRUNE_COMMENTED.format(why=f"prune needs the torch model: this model is a {source.kind}, with no layers to edit")
    else:
        prune = PRUNE_COMMENTED.format(why="prune, then fine-tune on a train split "
                                           "(add train to split:) to recover accuracy")
    gate = "max_accuracy_drop: 0.02     # labelled data: top-1 may drop at most 2 points" if labelled else \
        "min_agreement: 0.9          # no labels: top-1 must agree with the original on 90% of inputs"
    fallback = "max_accuracy_drop: 0.02" if labelled else "min_agreement: 0.9"
    return HEADER.format(file=file, name=name[:100], source=cfg.source, shape=shape, shape_origin=origin, data=data,
                         prune=prune, gate=gate, fallback=fallback)


def _ctx():
    from pipeline.sources.registry import BuildContext

    return BuildContext()
