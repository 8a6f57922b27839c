"""A pruned model as a portable file: only tensors and plain values, loadable with weights_only=True.

A pruned model cannot be rebuilt from its source alone (its layers are narrower, some blocks may be
gone), and pickling the module would make loading unsafe. So the checkpoint records the base model's
source, each layer's new widths, the blocks depth pruning dropped (`dropped`, optional) and the
state_dict; loading builds the base model, replaces the dropped blocks by a pass-through, resizes
its layers, and loads the weights strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.atomic import atomic_path
from pipeline.errors import BadInput

FORMAT = "fmap-checkpoint/1"
WIDTH_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
               "normalized_shape", "num_groups", "num_channels", "embed_dim", "kdim", "vdim",
               "head_dim", "num_heads", "hidden_dim")


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def layer_widths(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: {width attr: value}} for every module that stores a width attribute."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        attrs = {}
        for a in WIDTH_ATTRS:
            v = getattr(m, a, None)
            if isinstance(v, bool):
                continue
            if isinstance(v, int) or (isinstance(v, tuple) and all(isinstance(i, int) for i in v) and v):
                attrs[a] = _plain(v)
        if attrs:
            out[name] = attrs
    return out


def dropped_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks depth pruning replaced by a pass-through."""
    from pipeline.pruning.depth import Bypass

    return [n for n, m in model.named_modules() if isinstance(m, Bypass)]


def save_checkpoint(path: str | Path, model: nn.Module, *, base_source: dict[str, Any],
                    history: dict[str, Any]) -> Path:
    """Write the checkpoint atomically (torch.save into a temp file, then rename)."""
    obj = {
        "fmap_format": FORMAT,
        "base": dict(base_source),
        "dropped": dropped_blocks(model),
        "channels": layer_widths(model),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "history": history,
    }
    # into an open file: torch.save names a path's zip records after the (temp, pid-bearing) file name,
    # so the same checkpoint got another size and sha256 in every run; a file object's are "archive/"
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)


def is_fmap_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and str(obj.get("fmap_format", "")).startswith("fmap-checkpoint/")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True; BadInput if the file is not an fmap checkpoint."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadInput(f"cannot read checkpoint {path}: {exc}") from exc
    if not is_fmap_checkpoint(obj):
        raise BadInput(f"{path} is not an fmap checkpoint (no 'fmap_format' key)")
    if obj["fmap_format"] != FORMAT:
        raise BadInput(f"{path}: unsupported checkpoint format {obj['fmap_format']!r} (expected {FORMAT})")
    return obj


def load_checkpoint(path: str | Path, base_model: nn.Module) -> nn.Module:
    """Resize `base_model` (in place) to the saved widths, load the weights strictly, return it."""
    obj = read_checkpoint(path)
    return apply_checkpoint(obj, base_model, source=str(path))


def apply_checkpoint(obj: dict[str, Any], base_model: nn.Module, source: str = "checkpoint") -> nn.Module:
    from pipeline.pruning.depth import drop_blocks

    present = dict(base_model.named_modules())
    missing = [n for n in obj.get("dropped", []) if n not in present]
    if missing:
        raise BadInput(f"{source}: dropped block '{missing[0]}' does not exist in the base model (wrong model source?)")
    drop_blocks(base_model, list(obj.get("dropped", [])))
    modules = dict(base_model.named_modules())
    for name, attrs in obj["channels"].items():
        m = modules.get(name)
        if m is None:
            raise BadInput(f"{source}: layer '{name}' does not exist in the base model (wrong model source?)")
        for a, v in attrs.items():
            setattr(m, a, tuple(v) if isinstance(v, list) else v)
    state = obj["state_dict"]
    for key, tensor in state.items():
        mod_name, _, attr = key.rpartition(".")
        m = modules.get(mod_name)
        if m is None:
            continue  # load_state_dict(strict=True) below reports it
        current = getattr(m, attr, None)
        if isinstance(current, torch.Tensor) and current.shape != tensor.shape:
            new = torch.empty(tensor.shape, dtype=tensor.dtype)
            if isinstance(current, nn.Parameter):
                setattr(m, attr, nn.Parameter(new, requires_grad=current.requires_grad))
            else:
                m.register_buffer(attr, new)
    try:
        base_model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BadInput(f"{source} does not fit the base model: {str(exc).splitlines()[0]}") from exc
    return base_model
