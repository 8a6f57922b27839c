"""onnxruntime and OpenVINO backends: load, infer, describe (threads, precision), bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.backends import onnxruntime as ort_backend
from pipeline.backends import openvino as ov_backend
from pipeline.errors import BadInput
from pipeline.export.onnx import export_onnx
from conftest import run_quantize  # tests/ is on sys.path (rootdir conftest)


@pytest.fixture
def onnx_file(tiny_model, tmp_path):
    return export_onnx(tiny_model, torch.randn(1, 1, 16, 16), tmp_path / "tiny.onnx")


@pytest.mark.parametrize("backend", [ort_backend, ov_backend])
def test_infer_matches_torch(backend, onnx_file, tiny_model):
    assert backend.available() is None
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    sess = backend.load(onnx_file, threads=1, precision_hint="fp32")
    try:
        out = sess.infer(x)
    finally:
        sess.close()
    with torch.no_grad():
        ref = tiny_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)


def test_ort_describe_reports_threads_and_provider(onnx_file):
    d = ort_backend.load(onnx_file, threads=2).describe()
    assert d["backend"] == "onnxruntime" and d["threads"] == 2
    assert d["providers"][-1] == "CPUExecutionProvider"


def test_openvino_forces_f32_for_fp32_and_reports_precision(onnx_file):
    sess = ov_backend.load(onnx_file, threads=1, precision_hint="fp32")
    d = sess.describe()
    assert d["precision_hint"] == "f32" and d["threads"] == 1
    assert d["streams"] == 1  # one request at a time gets every thread: the latency setting
    assert set(d["execution_precision"]) == {"f32"} and sum(d["execution_precision"].values()) >= 4


def test_openvino_runs_qdq_int8_in_int8(tiny_model, tiny_data, make_ctx):
    from pipeline.stages.quantize import QuantizeConfig

    result = run_quantize(make_ctx(tiny_model, tiny_data),
                                 QuantizeConfig(backends=["openvino"], latency_iterations=2, samples=32, eval_samples=16))
    ov = result.metrics["artifacts"]["onnx_int8"]["backends"]["openvino"]
    assert {"i8", "u8"} & set(ov["execution_precision"]), ov["execution_precision"]
    assert result.metrics["artifacts"]["onnx_int8"]["latency_ms"]["openvino"] > 0


def test_unknown_gpu_provider_is_unavailable(onnx_file):
    from pipeline.backends.base import BackendUnavailable

    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(BackendUnavailable, match="cuda"):
        ort_backend.load(onnx_file, threads=1, providers=["cuda"])


@pytest.mark.parametrize("backend", [ort_backend, ov_backend])
def test_missing_and_corrupt_files_are_bad_input(backend, tmp_path):
    with pytest.raises(BadInput, match="absent.onnx"):
        backend.load(tmp_path / "absent.onnx", threads=1)
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(BadInput, match="corrupt.onnx"):
        backend.load(bad, threads=1)
