"""ONNX Runtime backend: one InferenceSession per artifact, CPU by default.

Graph optimisation is ORT_ENABLE_ALL (that is what fuses QDQ pairs into integer kernels) and the
intra-op thread count is fixed, so latency numbers are comparable across runs and backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.base import BackendUnavailable, SessionBase, backend
from pipeline.errors import BadInput

_GPU_PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def available() -> str | None:
    """None when onnxruntime imports, else the reason it cannot be used."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc})"
    return None


class OrtSession(SessionBase):
    """A loaded ONNX Runtime session that runs NCHW float32 batches."""

    backend = "onnxruntime"

    def __init__(self, session: Any, path: Path, threads: int, precision_hint: str | None) -> None:
        self._session = session
        self.path = path
        self.threads = threads
        self.precision_hint = precision_hint
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self._fp16_input = inp.type == "tensor(float16)"

    def infer(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float16 if self._fp16_input else np.float32)
        out = self._session.run(None, {self.input_name: x})[0]
        return out.astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"backend": self.backend, "version": ort.__version__,
                "providers": self._session.get_providers(), "threads": self.threads,
                "precision": self.precision_hint or "as-stored", "path": str(self.path),
                "spinning": getattr(self, "spinning", None)}

    def close(self) -> None:
        self._session = None


@backend("onnxruntime", loads=("onnx",), available=available, libraries=("onnxruntime",))
def load(path: str | Path, threads: int, precision_hint: str | None = None, **opts: Any) -> OrtSession:
    """Build a session. opts: `providers` (list of "cpu"/"cuda"/"tensorrt"), `optimization` ("all"/"basic"/"none")."""
    reason = available()
    if reason:
        raise BackendUnavailable(reason)
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"ONNX file not found: {path}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[opts.get("optimization", "all")]
    so.log_severity_level = 3
    # No busy-waiting between calls: a spinning pool steals the cores of whatever is timed next
    # (verify interleaves runtimes). Costs a few microseconds of wake-up per call.
    spin = "1" if opts.get("spinning") else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    providers = _providers(opts.get("providers"), ort.get_available_providers())
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise BadInput(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0][:300]}") from exc
    ort_session = OrtSession(session, path, so.intra_op_num_threads, precision_hint)
    ort_session.spinning = spin == "1"
    return ort_session


def _providers(requested: list[str] | None, present: list[str]) -> list[str]:
    """CPU always last; a GPU provider is used only when asked for and present in this build."""
    chosen = [_GPU_PROVIDERS[p] for p in (requested or []) if p in _GPU_PROVIDERS and _GPU_PROVIDERS[p] in present]
    missing = [p for p in (requested or []) if p in _GPU_PROVIDERS and _GPU_PROVIDERS[p] not in present]
    if missing and not chosen:
        raise BackendUnavailable(f"onnxruntime providers {missing} are not in this build ({present})")
    return [*chosen, "CPUExecutionProvider"]
