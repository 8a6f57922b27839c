"""The commented starter recipe written by `fmap init`."""

from __future__ import annotations

STARTER = """\
# fmap recipe: edit, then `fmap validate {file}` and `fmap run {file}`.
# Reference: docs/recipe.md (every key, its default, and what each stage writes).
name: {name}
seed: 0
threads: 2                     # intra-op threads for torch, onnxruntime and OpenVINO

model:
  source: {source}             # torchvision:NAME | builtin:NAME | python:package.module:factory
  # weights: path/to/weights.pth   # local state_dict (loaded with weights_only=True) or an fmap checkpoint
  input_shape: {shape}

data:
{data}
stages:
  - profile: {{}}                # per-layer feature maps, liveness peak memory, channel redundancy
  - prune:                     # structured channel pruning (torch-pruning's dependency graph)
      criterion: activation    # activation | apoz | l1 | l2 | taylor | bn_scale
      target: macs             # ratio | macs | params | peak_memory
      amount: 0.3              # remove 30% of the MACs
  - export: {{}}                 # FP32 ONNX, checked for equivalence with torch
  - quantize:
      mode: static             # static | dynamic | fp16
  - verify:
      backends: [torch, onnxruntime]
      gates:
        max_accuracy_drop: 0.01
"""

BUILTIN_DATA = """\
  calibration: {source: builtin, split: calibration}
  eval: {source: builtin, split: test}
  train: {source: builtin, split: train}
"""

RANDOM_DATA = """\
  # Replace with your images: {source: imagefolder, path: data/val, transform: imagenet}
  calibration: {source: random, samples: 64}
  eval: {source: random, samples: 64}
"""


def starter_recipe(model_spec: str) -> str:
    from pipeline.sources.models import default_input_shape, model_config_from_string

    cfg = model_config_from_string(model_spec)
    shape = default_input_shape(cfg)
    name = cfg.source.split(":")[-1].replace(".", "-").replace("_", "-") or "model"
    data = BUILTIN_DATA if cfg.source.startswith("builtin:") else RANDOM_DATA
    return STARTER.format(file="recipe.yaml", name=name, source=cfg.source, shape=shape, data=data)
