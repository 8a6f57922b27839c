"""TensorRT: visible skips, config validation, ONNX preparation, and (on a GPU) real engines.

Without CUDA nothing here can run TensorRT itself; a small stand-in `tensorrt` module drives the
build orchestration (artifacts, timing cache, metrics) so that glue is still covered. The
`gpu`-marked tests at the bottom build and run real engines where a GPU and tensorrt exist.
"""

from __future__ import annotations

import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.backends import tensorrt as trt_backend
from pipeline.backends.base import BackendUnavailable
from pipeline.errors import EXIT_STAGE_FAILED, BadInput, StageFailed
from pipeline.export import tensorrt as trt_export
from pipeline.export.tensorrt import (
    TensorRTConfig,
    layer_precisions,
    onnx_to_fp16,
    precision_mismatches,
    qdq_incompatibility,
)
from pipeline.stages.base import Artifact
from pipeline.stages.tensorrt import TensorRTStage, build_engines

REASON = "no CUDA device"


# --------------------------------------------------------------------------- helpers

def export_onnx(model: torch.nn.Module, path: Path, shape=(1, 1, 16, 16)) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def quantize_qdq(src: Path, dst: Path, signed_symmetric: bool) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.batches = iter([{"input": torch.randn(4, 1, 16, 16, generator=g).numpy()} for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8 if signed_symmetric else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True,
                    extra_options={"ActivationSymmetric": signed_symmetric})
    return dst


@pytest.fixture
def onnx_fp32(tiny_model, tmp_path) -> Path:
    return export_onnx(tiny_model, tmp_path / "tiny.onnx")


@pytest.fixture
def unavailable(monkeypatch):
    monkeypatch.setattr(trt_export, "tensorrt_unavailable_reason", lambda: REASON)
    monkeypatch.setattr(trt_backend, "available", lambda: REASON)


# --------------------------------------------------------------------------- config

def test_bad_precision_lists_the_choices():
    with pytest.raises(ValidationError) as err:
        TensorRTConfig(precision="fp8")
    assert "'fp16', 'int8' or 'best'" in str(err.value)


def test_config_defaults_and_checks():
    cfg = TensorRTConfig()
    assert (cfg.precision, cfg.workspace_mb, cfg.max_batch, cfg.opt_batch, cfg.timing_cache, cfg.require) == (
        "fp16", 1024, 8, 1, True, False)
    assert TensorRTConfig(precision="best").engine_precisions() == ["fp16", "int8"]
    with pytest.raises(ValidationError, match="opt_batch"):
        TensorRTConfig(opt_batch=16, max_batch=8)
    with pytest.raises(ValidationError, match="extra"):
        TensorRTConfig(calibrator="entropy")


# --------------------------------------------------------------------------- availability and skips

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU reason")
def test_available_names_missing_cuda():
    assert "no CUDA device" in (trt_backend.available() or "")
    assert trt_export.tensorrt_unavailable_reason() == trt_backend.available()


def test_available_names_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    reason = trt_backend.available()
    assert reason is not None and "pip install fmap[tensorrt]" in reason


def test_skip_is_visible_in_result_metrics_and_console(unavailable, tiny_model, tiny_data, make_ctx, capsys):
    result = build_engines(make_ctx(tiny_model, tiny_data), TensorRTConfig(precision="int8"))
    assert result.status == "skipped" and result.skip_reason == REASON
    assert result.metrics == {"tensorrt": {"status": "skipped", "reason": REASON}}
    assert not result.artifacts
    assert f"skipped tensorrt: {REASON}" in capsys.readouterr().err


def test_require_turns_the_skip_into_a_failure(unavailable, tiny_model, tiny_data, make_ctx):
    with pytest.raises(StageFailed, match=REASON) as err:
        build_engines(make_ctx(tiny_model, tiny_data), TensorRTConfig(require=True))
    assert err.value.exit_code == EXIT_STAGE_FAILED


def test_stage_wraps_build_engines(unavailable, tiny_model, tiny_data, make_ctx):
    stage = TensorRTStage()
    assert stage.name == "tensorrt" and stage.Config is TensorRTConfig
    assert stage.run(make_ctx(tiny_model, tiny_data), TensorRTConfig()).status == "skipped"


def test_backend_load_raises_unavailable_with_reason(unavailable, tmp_path):
    with pytest.raises(BackendUnavailable, match=REASON):
        trt_backend.load(tmp_path / "model.engine", threads=1)


def test_ort_gpu_providers_reports_each_provider():
    providers = trt_backend.ort_gpu_providers()
    assert set(providers) == {"TensorrtExecutionProvider", "CUDAExecutionProvider"}
    assert all(isinstance(v, bool) for v in providers.values())


# --------------------------------------------------------------------------- ONNX preparation (CPU)

def test_qdq_check_accepts_signed_symmetric_and_names_what_is_wrong(onnx_fp32, tmp_path):
    assert "no QuantizeLinear" in qdq_incompatibility(onnx_fp32)
    good = quantize_qdq(onnx_fp32, tmp_path / "int8.onnx", signed_symmetric=True)
    assert qdq_incompatibility(good) is None
    bad = quantize_qdq(onnx_fp32, tmp_path / "uint8.onnx", signed_symmetric=False)
    assert "uint8" in qdq_incompatibility(bad)


def test_onnx_to_fp16_keeps_float32_io_and_halves_weights(onnx_fp32, tmp_path):
    import onnx
    import onnxruntime as ort

    out = onnx_to_fp16(onnx_fp32, tmp_path / "fp16.onnx")
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32)
    ref = ort.InferenceSession(str(onnx_fp32), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    half = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(half, ref, atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------- engine inspection

INSPECTOR_JSON = json.dumps({"Layers": [
    {"Name": "conv1", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "x", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
     "Outputs": [{"Name": "a", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}]},
    {"Name": "reformat_in", "LayerType": "Reformat",
     "Inputs": [{"Name": "in", "Format/Datatype": "Row major linear FP32"}], "Outputs": []},
    {"Name": "fc", "LayerType": "CaskGemmMatrixMultiply",
     "Inputs": [{"Name": "p", "Format/Datatype": "Row major linear FP32"}], "Outputs": []},
    {"Name": "conv2", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "q", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
     "Outputs": []},
    {"Name": "shape_calc", "LayerType": "ElementWise",
     "Inputs": [{"Name": "s", "Format/Datatype": "Row major linear Int32"}], "Outputs": []},
]})


def test_layer_precisions_reads_inspector_formats():
    layers = layer_precisions(INSPECTOR_JSON)
    assert [layer["precision"] for layer in layers] == ["fp16", "fp32", "fp32", "int8", "int32"]
    assert layer_precisions(json.dumps({"Layers": ["a", "b"]}))[0]["precision"] == "unknown"


def test_precision_mismatches_skips_reformats_and_shape_math():
    layers = layer_precisions(INSPECTOR_JSON)
    assert [layer["name"] for layer in precision_mismatches(layers, "fp16")] == ["fc", "conv2"]
    assert [layer["name"] for layer in precision_mismatches(layers, "int8")] == ["conv1", "fc"]


# --------------------------------------------------------------------------- build orchestration, stand-in TensorRT

def fake_tensorrt(calls: dict) -> types.ModuleType:
    """Just enough of the TensorRT 10 Python API for build_engines' glue (no engines are real)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99-fake"
    enum = types.SimpleNamespace
    trt.BuilderFlag = enum(FP16="FP16", INT8="INT8")
    trt.NetworkDefinitionCreationFlag = enum(STRONGLY_TYPED=5)
    trt.MemoryPoolType = enum(WORKSPACE="WORKSPACE")
    trt.ProfilingVerbosity = enum(DETAILED="DETAILED")
    trt.LayerInformationFormat = enum(JSON="JSON")

    class ILogger:
        Severity = enum(INFO=3)

        def __init__(self) -> None:
            pass

    class Memory(bytes):
        def serialize(self):
            return self

    class Config:
        def __init__(self) -> None:
            self.flags: list[str] = []
            calls.setdefault("configs", []).append(self)

        def set_memory_pool_limit(self, pool, size):
            self.workspace = size

        def set_flag(self, flag):
            self.flags.append(flag)

        def create_timing_cache(self, data):
            self.cache_in = data
            return Memory(data + b"T")

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            self.profile = profile

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            self.shapes = (name, mn, opt, mx)

    class Network:
        num_inputs = 1

        def get_input(self, i):
            return enum(name="input", shape=[-1, 1, 16, 16])

    class Builder:
        def __init__(self, logger) -> None:
            self.logger = logger

        def create_network(self, flags):
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            self.logger.log(3, "built")
            return Memory(b"PLAN" + b"".join(f.encode() for f in config.flags))

    class OnnxParser:
        def __init__(self, network, logger) -> None:
            pass

        def parse_from_file(self, path):
            calls.setdefault("parsed", []).append(Path(path).name)
            return True

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, plan):
            return enum(create_engine_inspector=lambda: enum(get_engine_information=lambda fmt: INSPECTOR_JSON))

    trt.ILogger, trt.Builder, trt.OnnxParser, trt.Runtime = ILogger, Builder, OnnxParser, Runtime
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    monkeypatch.setattr(trt_export, "tensorrt_unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    return calls


def test_build_best_writes_engines_logs_layers_and_timing_cache(fake_trt, onnx_fp32, tmp_path,
                                                                 tiny_model, tiny_data, make_ctx):
    int8 = quantize_qdq(onnx_fp32, tmp_path / "int8.onnx", signed_symmetric=True)
    ctx = make_ctx(tiny_model, tiny_data)
    ctx.artifacts["onnx_int8"] = Artifact(int8, "onnx", "int8")
    cfg = TensorRTConfig(precision="best", max_batch=4, opt_batch=2, workspace_mb=64)
    result = build_engines(ctx, cfg, sources={"onnx_fp32": Artifact(onnx_fp32, "onnx", "fp32")})

    assert result.status == "ok"
    assert fake_trt["parsed"] == ["tiny.onnx", "int8.onnx"]
    fp16_cfg, int8_cfg = fake_trt["configs"]
    assert fp16_cfg.flags == ["FP16"] and int8_cfg.flags == ["FP16", "INT8"]  # best: FP16 off the Q/DQ path
    assert fp16_cfg.profile.shapes == ("input", [1, 1, 16, 16], [2, 1, 16, 16], [4, 1, 16, 16])
    assert fp16_cfg.workspace == 64 << 20
    assert fake_trt["network_flags"] == 0  # weak typing while the precision flags exist
    assert int8_cfg.cache_in == b"T"  # the second build loaded the cache the first one saved
    for key in ("trt_fp16", "trt_int8"):
        art = result.artifacts[key]
        assert art.kind == "tensorrt" and art.precision == key[4:] and art.path.read_bytes().startswith(b"PLAN")
        assert "built" in result.artifacts[f"{key}_log"].path.read_text()
        assert json.loads(result.artifacts[f"{key}_layers"].path.read_text())["requested"] == key[4:]
    assert result.artifacts["trt_timing_cache"].path.read_bytes() == b"TT"
    m = result.metrics["tensorrt"]
    assert (m["status"], m["typing"], m["device"]) == ("ok", "weak", "Fake GPU")
    assert m["engines"]["fp16"]["batch_range"] == [1, 2, 4]
    assert [x["name"] for x in m["engines"]["fp16"]["mismatched_layers"]] == ["fc", "conv2"]
    assert m["engines"]["int8"]["mismatched_count"] == 2
    json.dumps(result.metrics)  # JSON-serialisable


def test_build_int8_without_qdq_model_skips_with_reason(fake_trt, onnx_fp32, tiny_model, tiny_data, make_ctx):
    ctx = make_ctx(tiny_model, tiny_data)
    ctx.artifacts["onnx_fp32"] = Artifact(onnx_fp32, "onnx", "fp32")
    result = build_engines(ctx, TensorRTConfig(precision="int8"))
    assert result.status == "skipped" and "onnx_int8" in result.skip_reason
    assert result.metrics["tensorrt"]["engines"]["int8"]["status"] == "skipped"
    with pytest.raises(StageFailed, match="onnx_int8"):
        build_engines(ctx, TensorRTConfig(precision="int8", require=True))


def test_build_rejects_uint8_qdq_and_missing_onnx(fake_trt, onnx_fp32, tmp_path, tiny_model, tiny_data, make_ctx):
    ctx = make_ctx(tiny_model, tiny_data)
    with pytest.raises(BadInput, match="ONNX"):
        build_engines(ctx, TensorRTConfig())
    ctx.artifacts["onnx_int8"] = Artifact(quantize_qdq(onnx_fp32, tmp_path / "u8.onnx", False), "onnx", "int8")
    result = build_engines(ctx, TensorRTConfig(precision="int8"))
    assert result.status == "skipped" and "uint8" in result.skip_reason


def test_strong_typing_builds_fp16_from_an_fp16_onnx_copy(fake_trt, onnx_fp32, tiny_model, tiny_data, make_ctx):
    del sys.modules["tensorrt"].BuilderFlag.FP16  # TensorRT 11: weak-typing flags are gone
    ctx = make_ctx(tiny_model, tiny_data)
    ctx.artifacts["onnx_fp32"] = Artifact(onnx_fp32, "onnx", "fp32")
    result = build_engines(ctx, TensorRTConfig(timing_cache=False))
    assert result.metrics["tensorrt"]["typing"] == "strong"
    assert fake_trt["network_flags"] == 1 << 5 and fake_trt["configs"][0].flags == []
    assert fake_trt["parsed"] == ["model_fp16.onnx"]
    assert "trt_timing_cache" not in result.artifacts


# --------------------------------------------------------------------------- real TensorRT (GPU only)

@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_gpu_fp16_engine_runs_and_matches_torch(tiny_model, tiny_data, make_ctx, onnx_fp32):
    ctx = make_ctx(tiny_model, tiny_data)
    result = build_engines(ctx, TensorRTConfig(precision="fp16", max_batch=8, require=True),
                           sources={"onnx_fp32": Artifact(onnx_fp32, "onnx", "fp32")})
    assert result.status == "ok", result.skip_reason
    session = trt_backend.load(result.artifacts["trt_fp16"].path, threads=1, precision_hint="fp16")
    try:
        for batch in (1, 3, 11):  # 11 > max_batch: chunked
            x = torch.randn(batch, 1, 16, 16)
            with torch.no_grad():
                ref = tiny_model(x).numpy()
            out = session.infer(x.numpy())
            assert out.shape == ref.shape
            np.testing.assert_allclose(out, ref, atol=5e-2, rtol=5e-2)
        assert session.describe()["batch_range"] == [1, 1, 8]
    finally:
        session.close()
    assert (ctx.run_dir / "tensorrt" / "timing.cache").stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_gpu_int8_engine_from_qdq_model(tiny_model, tiny_data, make_ctx, onnx_fp32, tmp_path):
    int8 = quantize_qdq(onnx_fp32, tmp_path / "int8.onnx", signed_symmetric=True)
    ctx = make_ctx(tiny_model, tiny_data)
    result = build_engines(ctx, TensorRTConfig(precision="int8", require=True),
                           sources={"onnx_int8": Artifact(int8, "onnx", "int8")})
    engine = result.metrics["tensorrt"]["engines"]["int8"]
    assert engine["status"] == "ok" and engine["precision_counts"].get("int8", 0) > 0
    session = trt_backend.load(result.artifacts["trt_int8"].path, threads=1)
    try:
        x = torch.randn(4, 1, 16, 16)
        out = session.infer(x.numpy())
        assert out.shape == (4, 10) and np.isfinite(out).all()
    finally:
        session.close()
