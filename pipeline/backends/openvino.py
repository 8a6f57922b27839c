"""OpenVINO backend: reads ONNX (including QDQ INT8) directly and compiles it for the CPU.

Two things make the numbers honest. FP32 artifacts are compiled with INFERENCE_PRECISION_HINT=f32,
because OpenVINO's default on AMX CPUs is bf16 (a silent precision change). And `describe()` reports
the precision the compiled graph really runs its convolutions/matmuls in, read from the runtime
model, so an INT8 artifact that fell back to float is visible.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.base import BackendUnavailable, SessionBase, backend
from pipeline.errors import BadInput

_COMPUTE_LAYERS = {"Convolution", "FullyConnected", "MatMul", "Deconvolution", "GroupConvolution"}


def available() -> str | None:
    """None when openvino imports and sees a CPU, else the reason it cannot be used."""
    try:
        import openvino as ov
    except ImportError as exc:
        return f"openvino is not installed ({exc})"
    try:
        if "CPU" not in ov.Core().available_devices:
            return "openvino sees no CPU device"
    except Exception as exc:  # plugin loading errors
        return f"openvino cannot start: {exc}"
    return None


class OpenVinoSession(SessionBase):
    """A compiled OpenVINO model that runs NCHW float32 batches."""

    backend = "openvino"

    def __init__(self, compiled: Any, path: Path, device: str, threads: int, hint: str | None) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self.path, self.device, self.threads, self.hint = path, device, threads, hint

    def infer(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._request.infer({0: x})
        return np.array(self._request.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def execution_precision(self) -> dict[str, int]:
        """Count compute layers by the precision they actually run in (e.g. {"u8": 20, "f32": 1})."""
        counts: Counter[str] = Counter()
        for op in self._compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if "layerType" in info and str(info["layerType"].astype(str)) in _COMPUTE_LAYERS:
                counts[str(info["runtimePrecision"].astype(str))] += 1
        return dict(counts)

    def describe(self) -> dict[str, Any]:
        import openvino as ov

        try:
            value = self._compiled.get_property("INFERENCE_PRECISION_HINT")
            hint = value.to_string() if hasattr(value, "to_string") else str(value)
        except Exception:  # not every device exposes it
            hint = None
        return {"backend": self.backend, "version": ov.get_version(), "device": self.device,
                "threads": int(self._compiled.get_property("INFERENCE_NUM_THREADS")),
                "streams": self._property("NUM_STREAMS", int),
                "cpu_pinning": self._property("ENABLE_CPU_PINNING", bool),
                "precision_hint": hint, "requested_precision": self.hint,
                "execution_precision": self.execution_precision(), "path": str(self.path)}

    def _property(self, name: str, cast: Any) -> Any:
        """A compiled-model property, or None where this device/version does not expose it."""
        try:
            return cast(self._compiled.get_property(name))
        except Exception:
            return None

    def close(self) -> None:
        self._request = None
        self._compiled = None


@backend("openvino", loads=("onnx", "openvino"), available=available, libraries=("openvino",))
def load(path: str | Path, threads: int, precision_hint: str | None = None, **opts: Any) -> OpenVinoSession:
    """Compile `path` for `opts.get("device", "CPU")`.

    precision_hint: the artifact's precision. "fp32" (or None) forces f32 execution; "int8" keeps
    f32 for the non-quantized parts too; "fp16"/"bf16" let OpenVINO use that precision.
    opts: `performance_hint` (LATENCY), `num_streams` (1: one request at a time, all threads on it),
    `cpu_pinning` (default False: unpinned, so interleaved runtimes do not fight over cores).
    """
    reason = available()
    if reason:
        raise BackendUnavailable(reason)
    import openvino as ov

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"model file not found: {path}")
    device = opts.get("device", "CPU")
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": max(1, int(threads)),
                              "PERFORMANCE_HINT": opts.get("performance_hint", "LATENCY"),
                              "NUM_STREAMS": int(opts.get("num_streams", 1))}
    # Unpinned by default: pinned TBB workers hold their cores against the other runtimes that
    # verify interleaves (TBB has no spin switch; pinning is what keeps its pool on the cores).
    config["ENABLE_CPU_PINNING"] = bool(opts.get("cpu_pinning", False))
    exec_precision = {"fp16": "f16", "bf16": "bf16"}.get(precision_hint or "fp32", "f32")
    config["INFERENCE_PRECISION_HINT"] = exec_precision
    core = ov.Core()
    try:
        model = core.read_model(str(path))
    except Exception as exc:
        raise BadInput(f"openvino cannot read {path}: {str(exc).splitlines()[0][:300]}") from exc
    try:
        compiled = core.compile_model(model, device, config)
    except Exception:
        # f16 is not supported on every CPU: fall back to the device default rather than fail
        config.pop("INFERENCE_PRECISION_HINT")
        compiled = core.compile_model(model, device, config)
    return OpenVinoSession(compiled, path, device, threads, precision_hint)
