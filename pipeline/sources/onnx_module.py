"""An ONNX file behind the nn.Module interface, so the runner, export, quantize and verify treat an
`onnx:` model like any other: forward runs onnxruntime on CPU.

The initializers are registered as buffers, so `state_dict()` sizes the model honestly; the module
is marked graph-only (`fmap_graph_only`), so hook-based stages know they cannot see its layers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class OnnxModule(nn.Module):
    fmap_graph_only = True

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        import onnx
        from onnx import numpy_helper

        self.onnx_path = Path(path)
        proto = onnx.load(str(self.onnx_path))
        taken: set[str] = set()
        for init in proto.graph.initializer:
            key = re.sub(r"\W", "_", init.name) or "w"
            while key in taken or hasattr(nn.Module, key):
                key += "_"
            taken.add(key)
            self.register_buffer(key, torch.from_numpy(np.array(numpy_helper.to_array(init))))
        dims = proto.graph.input[0].type.tensor_type.shape.dim if proto.graph.input else []
        self.static_batch = bool(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == 1
        self._session: Any = None
        self._threads: int | None = None

    def _sess(self) -> Any:
        import onnxruntime as ort

        threads = torch.get_num_threads()
        if self._session is None or self._threads != threads:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(str(self.onnx_path), opts, providers=["CPUExecutionProvider"])
            self._threads = threads
        return self._session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sess = self._sess()
        name = sess.get_inputs()[0].name
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if self.static_batch and arr.shape[0] != 1:  # a batch-1 graph runs a batch sample by sample
            out = np.concatenate([sess.run(None, {name: arr[i:i + 1]})[0] for i in range(arr.shape[0])])
        else:
            out = sess.run(None, {name: arr})[0]
        return torch.from_numpy(np.ascontiguousarray(out))

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxModule:
        return OnnxModule(self.onnx_path)  # the file is immutable; a copy is a fresh session over it

    def extra_repr(self) -> str:
        return str(self.onnx_path)
