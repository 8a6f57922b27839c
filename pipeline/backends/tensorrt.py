"""TensorRT backend: run a serialized engine (".engine" plan) on a CUDA device.

Engines are device- and version-specific, so this backend only ever *runs* plans that
pipeline/export/tensorrt.py built on the same machine. I/O buffers are torch CUDA tensors, which
spares a pycuda/cuda-python dependency: torch already owns the CUDA context and the stream.
Everything heavy (tensorrt, torch.cuda) is imported inside functions; `import pipeline` never
needs TensorRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.base import BackendUnavailable, SessionBase, backend

INSTALL_HINT = "pip install fmap[tensorrt]"
# onnxruntime's own GPU providers, reported beside TensorRT as a comparison point.
ORT_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def available() -> str | None:
    """None when TensorRT can run here, else every reason it cannot (joined by '; ')."""
    reasons: list[str] = []
    try:
        import torch

        if not torch.cuda.is_available():
            reasons.append("no CUDA device")
    except Exception as exc:  # pragma: no cover - torch is a hard dependency
        reasons.append(f"torch.cuda unusable: {exc}")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        reasons.append(f"tensorrt package not installed ({INSTALL_HINT})")
    except Exception as exc:  # a wheel whose CUDA libraries are missing raises OSError
        reasons.append(f"tensorrt failed to import: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return "; ".join(reasons) or None


def ort_gpu_providers() -> dict[str, bool]:
    """Which onnxruntime GPU execution providers this install offers (for comparison rows)."""
    try:
        import onnxruntime as ort

        have = set(ort.get_available_providers())
    except Exception:  # pragma: no cover - onnxruntime is a hard dependency
        have = set()
    return {name: name in have for name in ORT_GPU_PROVIDERS}


@backend("tensorrt", loads=("tensorrt",), available=available, libraries=("tensorrt",))
def load(path: str | Path, threads: int = 1, precision_hint: str | None = None, **opts: Any) -> TensorRTSession:
    """Deserialize an engine into a ready session; BackendUnavailable when it cannot run here.

    `threads` is accepted for interface symmetry (TensorRT runs on the GPU); `opts` may carry
    `device` (CUDA ordinal, default 0). Other options are ignored so verify can pass one dict.
    """
    reason = available()
    if reason:
        raise BackendUnavailable(reason)
    return TensorRTSession(Path(path), threads=threads, precision_hint=precision_hint,
                           device=int(opts.get("device", 0)))


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT8: torch.int8,
        trt.DataType.INT32: torch.int32,
        trt.DataType.BOOL: torch.bool,
    }
    for name, tdtype in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = tdtype
    if dtype not in table:
        raise BackendUnavailable(f"engine uses I/O dtype {dtype}, which fmap's TensorRT session cannot feed")
    return table[dtype]


class TensorRTSession(SessionBase):
    """One engine + execution context; `infer` feeds one NCHW batch, returns the first output.

    Batches larger than the engine's optimisation-profile maximum are run in chunks, so verify can
    use its usual eval batch size against an engine built with a small `max_batch`.
    """

    backend = "tensorrt"

    def __init__(self, path: Path, threads: int = 1, precision_hint: str | None = None, device: int = 0) -> None:
        import tensorrt as trt
        import torch

        if not path.is_file():
            raise BackendUnavailable(f"TensorRT engine not found: {path}")
        self._trt = trt
        self._device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self._device):
            self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self._engine is None:
                raise BackendUnavailable(
                    f"cannot deserialize {path.name}: built by another TensorRT version or GPU; rebuild it here")
            self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self._inputs) != 1:
            raise BackendUnavailable(f"engine has {len(self._inputs)} inputs; fmap's TensorRT session feeds one")
        self._in_name = self._inputs[0]
        self._in_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(self._in_name))
        self._out_dtypes = {n: _torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in self._outputs}
        static = tuple(self._engine.get_tensor_shape(self._in_name))
        if -1 in static:
            mn, opt, mx = (tuple(s) for s in self._engine.get_tensor_profile_shape(self._in_name, 0))
            self._batch_range = (int(mn[0]), int(opt[0]), int(mx[0]))
        else:
            self._batch_range = (int(static[0]),) * 3
        self._static_batch = -1 not in static
        self._buffers: dict[tuple[int, ...], dict[str, Any]] = {}
        self.threads = threads
        self.precision_hint = precision_hint
        self.path = path

    def _outputs_for(self, shape: tuple[int, ...]) -> dict[str, Any]:
        """Output tensors for an input shape, allocated once per shape (keeps timing loops lean)."""
        import torch

        if shape not in self._buffers:
            self._context.set_input_shape(self._in_name, shape)
            self._buffers[shape] = {
                n: torch.empty(tuple(self._context.get_tensor_shape(n)), dtype=self._out_dtypes[n], device=self._device)
                for n in self._outputs
            }
        return self._buffers[shape]

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        xt = torch.from_numpy(np.ascontiguousarray(x)).to(self._device, dtype=self._in_dtype)
        shape = tuple(int(d) for d in xt.shape)
        outs = self._outputs_for(shape)
        self._context.set_input_shape(self._in_name, shape)
        self._context.set_tensor_address(self._in_name, xt.data_ptr())
        for name, tensor in outs.items():
            self._context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream(self._device)  # same stream as the H2D copy above: ordered
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see TensorRT log)")
        stream.synchronize()
        return outs[self._outputs[0]].float().cpu().numpy()

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run one batch, chunked by the engine's max batch when the batch is larger."""
        max_batch = self._batch_range[2]
        if self._static_batch and x.shape[0] != max_batch and max_batch != 1:
            raise ValueError(f"engine has a static batch of {max_batch}; got a batch of {x.shape[0]}")
        if x.shape[0] <= max_batch:
            return self._run(x)
        return np.concatenate([self._run(x[i:i + max_batch]) for i in range(0, x.shape[0], max_batch)])

    def describe(self) -> dict[str, Any]:
        import torch

        return {
            "backend": self.backend,
            "version": self._trt.__version__,
            "device": torch.cuda.get_device_name(self._device),
            "providers": ["TensorRT"],
            "threads": self.threads,
            "precision": self.precision_hint,
            "batch_range": list(self._batch_range),
            "engine": self.path.name,
            "ort_gpu_providers": ort_gpu_providers(),
        }

    def close(self) -> None:
        self._buffers.clear()
        self._context = None
        self._engine = None
