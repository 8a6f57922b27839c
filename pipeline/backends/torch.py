"""The torch backend: runs an nn.Module (in memory) or an fmap checkpoint on CPU, eager mode.

torch's intra-op thread count is process-wide; a session sets its own count only for the length
of each `infer` call and puts the previous one back, so loading or running a session never
changes the threads the rest of the process (or another session) runs with.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.backends.base import BackendUnavailable, SessionBase, backend


def available() -> str | None:
    return None  # torch is a hard dependency


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's thread count set to `threads` inside the block only (unchanged when None or equal)."""
    previous = torch.get_num_threads()
    if not threads or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TorchSession(SessionBase):
    """Runs one batch under inference_mode; numpy in, numpy out, like every other backend."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module, threads: int | None) -> None:
        self.model = model.eval()
        self.threads = threads

    def infer(self, x: np.ndarray) -> np.ndarray:
        with torch_threads(self.threads), torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif isinstance(out, dict):
            out = next(iter(out.values()))
        return out.detach().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"backend": "torch", "version": torch.__version__, "device": "cpu",
                "threads": self.threads or torch.get_num_threads(), "precision": _precision(self.model)}

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


def _precision(model: torch.nn.Module) -> str:
    dtypes = {p.dtype for p in model.parameters()}
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        next(iter(dtypes)), str(dtypes)) if len(dtypes) == 1 else "mixed"


@backend("torch", loads=("torch",), available=available, libraries=("torch",))
def load(artifact: torch.nn.Module | str | Path, threads: int | None = None,
         precision_hint: str | None = None, **opts: Any) -> TorchSession:
    """Accept a module directly, or an fmap checkpoint path plus `base_model=` (the unpruned model
    the checkpoint's layer widths and weights are applied to: pipeline.pruning.checkpoint)."""
    if isinstance(artifact, torch.nn.Module):
        return TorchSession(artifact, threads)
    base_model = opts.get("base_model")
    if base_model is None:
        raise BackendUnavailable(f"torch checkpoint {artifact} needs base_model= to be loaded")
    from pipeline.pruning.checkpoint import load_checkpoint

    return TorchSession(load_checkpoint(Path(artifact), copy.deepcopy(base_model)), threads)
