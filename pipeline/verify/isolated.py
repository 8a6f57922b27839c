"""Time one artifact in a process of its own (`verify.latency.isolate: true`).

Interleaving in one process is what makes speedup intervals tight, but every runtime's thread pool
then shares the process and its cores. Isolation trades that for certainty that no other session
exists while one is timed: each artifact x backend runs in a fresh Python process, one after the
other, with the passive-wait thread settings applied before torch loads. Speedups from isolated
timings are unpaired (the iterations of two processes did not see the same moment).

The child is `python -m pipeline.verify.isolated SPEC.json`; SPEC names the backend, the artifact
(an ONNX/engine path, or for torch the recipe's model config plus an optional fmap checkpoint, so
no pickled module ever crosses the process boundary), the input batch (.npy), threads, warmup and
iterations. It prints `{"times_ms": [...]}` as its last stdout line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def time_in_subprocess(spec: dict[str, Any], batch: np.ndarray, timeout_s: float = 900) -> list[float]:
    """Run the child for one artifact x backend; return its per-iteration times in ms."""
    with tempfile.TemporaryDirectory(prefix="fmap-isolated-") as tmp:
        x_path = Path(tmp) / "x.npy"
        np.save(x_path, batch)
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps({**spec, "input": str(x_path)}))
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = subprocess.run([sys.executable, "-m", "pipeline.verify.isolated", str(spec_path)],
                              capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise RuntimeError(f"isolated timing process failed (exit {proc.returncode}): {tail}")
    return [float(t) for t in json.loads(proc.stdout.strip().splitlines()[-1])["times_ms"]]


def _load_session(spec: dict[str, Any]) -> Any:
    from pipeline.backends import get_backend
    from pipeline.plugins import load_plugins

    load_plugins(spec.get("plugins", []))  # a plug-in backend must be registered here too
    backend = get_backend(spec["backend"])
    if spec["backend"] != "torch":
        return backend.load(spec["artifact"], threads=spec["threads"], precision_hint=spec.get("precision"))
    from pipeline.recipe_models import ModelConfig
    from pipeline.sources.models import build_model

    model = build_model(ModelConfig.model_validate(spec["model"]))
    if spec.get("checkpoint"):
        from pipeline.pruning.checkpoint import load_checkpoint

        model = load_checkpoint(spec["checkpoint"], model)
    return backend.load(model, threads=spec["threads"])


def child(spec_path: str) -> None:
    from pipeline.verify.latency import measure

    spec = json.loads(Path(spec_path).read_text())
    x = np.load(spec["input"])
    from pipeline.backends.torch import torch_threads

    with torch_threads(spec["threads"]), _load_session(spec) as session:  # no switching inside the loop
        times = measure({"x": lambda: session.infer(x)}, spec["warmup"], spec["iterations"], interleave=False)["x"]
    print(json.dumps({"times_ms": times}))


if __name__ == "__main__":  # pragma: no cover - exercised through time_in_subprocess
    from pipeline.verify.threads import quiet_thread_pools

    quiet_thread_pools()  # before torch loads, as in the fmap CLI
    child(sys.argv[1])
