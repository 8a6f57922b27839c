"""Quantize stage: static QDQ, streaming calibration, fallback naming the outlier layer, fp16/dynamic,
equalization and bias correction, bad inputs."""

from __future__ import annotations

import weakref
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from pipeline.errors import BadInput
from pipeline.sources.data import DataBundle, DataSplit, TensorSplit
from pipeline.stages.base import Artifact
from pipeline.stages.quantize import QuantizeConfig
from conftest import run_quantize  # tests/ is on sys.path (rootdir conftest)

FAST = {"backends": ["onnxruntime"], "latency_iterations": 2, "eval_samples": 32, "samples": 32}


class OutlierNet(nn.Module):
    """conv1 -> `outlier` (one output channel 1000x larger) -> conv3 (ignores that channel) -> fc.

    Per-tensor activation scales for `outlier`'s output are set by the huge channel, so every other
    channel rounds to zero: exactly what conv3 reads. Keeping `outlier` float fixes it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.outlier = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(256, 10)
        with torch.no_grad():
            self.outlier.weight[0] *= 1000.0
            self.conv3.weight[:, 0] = 0.0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv3(torch.relu(self.outlier(torch.relu(self.conv1(x))))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 4), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@pytest.fixture
def outlier_setup():
    torch.manual_seed(0)
    model = OutlierNet().eval()
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # centre the logits so FP32 predictions vary with the input
        model.fc.bias.copy_(-model.fc.weight @ model.features(x).mean(0))
    split = TensorSplit("rand", x, None, batch_size=16)
    return model, DataBundle(calibration=split, eval=split)


def test_static_int8_is_qdq_and_scored(tiny_model, tiny_data, make_ctx):
    ctx = make_ctx(tiny_model, tiny_data)
    result = run_quantize(ctx, QuantizeConfig(**FAST))
    art = result.artifacts["onnx_int8"]
    assert art.precision == "int8" and art.path.name == "model_int8.onnx"
    ops = {n.op_type for n in onnx.load(str(art.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    m = result.metrics
    assert m["mode"] == "static" and m["calibration"] == "minmax"
    entry = m["artifacts"]["onnx_int8"]
    assert entry["agreement"] >= 0.9 and entry["accuracy"] is not None
    assert entry["latency_ms"]["onnxruntime"] > 0 and entry["size_bytes"] > 0
    assert m["fp32"]["agreement"] == 1.0
    assert set(result.artifacts) == {"onnx_int8"}  # what it declares: the FP32 file is export's
    assert 0 < len(m["layer_errors"]) <= 10 and {"tensor", "sqnr_db", "rel_err"} <= set(m["layer_errors"][0])
    assert m["fallback"]["steps"][0]["step"] == 0


def test_fallback_names_outlier_layer(outlier_setup, make_ctx):
    model, data = outlier_setup
    ctx = make_ctx(model, data)
    cfg = QuantizeConfig(**FAST, fallback={"min_agreement": 0.95, "max_float_layers": 2, "max_steps": 2})
    fb = run_quantize(ctx, cfg).metrics["fallback"]
    assert fb["steps"][0]["agreement"] < 0.5  # the plain INT8 model is broken by the outlier
    assert fb["float_layers"][0] == "/outlier/Conv"
    assert fb["met"] and fb["steps"][-1]["agreement"] >= 0.95
    assert "/outlier/Conv" in fb["excluded_nodes"] and "/conv3/Conv" in fb["excluded_nodes"]


def test_no_fallback_without_target(outlier_setup, make_ctx):
    model, data = outlier_setup
    fb = run_quantize(make_ctx(model, data), QuantizeConfig(**FAST)).metrics["fallback"]
    assert fb["float_layers"] == [] and len(fb["steps"]) == 1


class CountingSplit(DataSplit):
    """Hands out numpy-backed batches and tracks (by weakref on the numpy buffer, which any tensor
    view or `.numpy()` copy-free array keeps alive) how many are alive at once."""

    def __init__(self, n: int = 96, bs: int = 8) -> None:
        self.num_samples, self.batch_size, self.has_labels = n, bs, False
        self.refs: list[weakref.ref] = []
        self.max_alive = 0
        self.served = 0

    def batches(self, batch_size=None):
        bs = batch_size or self.batch_size
        rng = np.random.default_rng(0)
        for _ in range(0, self.num_samples, bs):
            buf = rng.standard_normal((bs, 1, 16, 16), dtype=np.float32)
            self.refs.append(weakref.ref(buf))
            x = torch.from_numpy(buf)
            del buf
            self.max_alive = max(self.max_alive, self.alive())
            self.served += bs
            yield x, None

    def alive(self) -> int:
        return sum(r() is not None for r in self.refs)


def test_calibration_streams_batches(tiny_model, make_ctx):
    import gc

    split = CountingSplit()
    ctx = make_ctx(tiny_model, DataBundle(calibration=split), example_input=torch.randn(1, 1, 16, 16))
    from pipeline.quantization.calibration import StreamingReader
    from pipeline.quantization.ort_quant import preprocess, quantize_static_qdq
    from pipeline.stages.export import ExportConfig, export_fp32

    art, _ = export_fp32(ctx, ExportConfig())
    prep = preprocess(art.path, ctx.path("prep.onnx"))
    split.max_alive = 0
    gc.collect()
    reader = StreamingReader(split, "input", samples=80)
    out = quantize_static_qdq(prep, ctx.path("q.onnx"), reader)
    assert out.is_file() and reader.served == 80
    assert split.max_alive <= 3, f"calibration held {split.max_alive} batches at once"
    held = [feed["input"] for feed in StreamingReader(split, "input", samples=80)]  # a reader that holds
    assert len(held) == 10 and split.alive() == 10  # ...is what the counter would catch


@pytest.mark.parametrize("mode,name,precision", [("fp16", "onnx_fp16", "fp16"), ("dynamic", "onnx_int8", "int8")])
def test_fp16_and_dynamic_are_runnable(mode, name, precision, tiny_model, tiny_data, make_ctx):
    result = run_quantize(make_ctx(tiny_model, tiny_data), QuantizeConfig(mode=mode, **FAST))
    art = result.artifacts[name]
    assert art.precision == precision
    sess = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": np.random.rand(3, 1, 16, 16).astype(np.float32)})[0]
    assert out.shape == (3, 10) and np.isfinite(out).all()
    if mode == "fp16":
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(str(art.path)).graph.initializer)
    else:
        assert {"DynamicQuantizeLinear"} & {n.op_type for n in onnx.load(str(art.path)).graph.node}
    assert result.metrics["artifacts"][name]["agreement"] >= 0.9


def test_mode_error_lists_modes():
    with pytest.raises(ValidationError, match="static.*dynamic.*fp16"):
        QuantizeConfig(mode="int4")
    with pytest.raises(ValidationError):
        QuantizeConfig(calibratoin="minmax")


def test_missing_or_corrupt_fp32_artifact_is_bad_input(tiny_model, tiny_data, make_ctx, tmp_path):
    ctx = make_ctx(tiny_model, tiny_data)
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"garbage")
    ctx.artifacts["onnx_fp32"] = Artifact(bad, "onnx", "fp32")
    with pytest.raises(BadInput, match="broken.onnx"):
        run_quantize(ctx, QuantizeConfig(**FAST))
    ctx.artifacts["onnx_fp32"] = Artifact(tmp_path / "gone.onnx", "onnx", "fp32")
    with pytest.raises(BadInput, match="gone.onnx"):
        run_quantize(ctx, QuantizeConfig(**FAST))


def test_unknown_exclude_is_bad_input(tiny_model, tiny_data, make_ctx):
    with pytest.raises(BadInput, match="nosuchlayer"):
        run_quantize(make_ctx(tiny_model, tiny_data), QuantizeConfig(exclude=["nosuchlayer"], **FAST))


def test_exclude_by_module_path_keeps_layer_float(tiny_model, tiny_data, make_ctx):
    result = run_quantize(make_ctx(tiny_model, tiny_data), QuantizeConfig(exclude=["fc"], **FAST))
    graph = onnx.load(str(result.artifacts["onnx_int8"].path)).graph
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert producers.get(gemm.input[1]) != "DequantizeLinear"  # weight stayed float


def test_equalization_preserves_function_and_evens_ranges(tmp_path):
    from pipeline.export.onnx import export_onnx
    from pipeline.quantization.equalization import equalize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight[2] *= 50  # one channel with a huge range
    x = torch.randn(2, 3, 10, 10)
    src = export_onnx(model, x[:1], tmp_path / "m.onnx")
    dst, pairs = equalize(src, tmp_path / "cle.onnx")
    assert pairs == 2
    a = ort.InferenceSession(str(src)).run(None, {"input": x.numpy()})[0]
    b = ort.InferenceSession(str(dst)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    w = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer}
    conv0 = next(n for n in onnx.load(str(dst)).graph.node if n.op_type == "Conv")
    ranges = np.abs(w[conv0.input[1]]).reshape(8, -1).max(1)
    assert ranges.max() / ranges.min() < 10  # was > 50 before


def test_bias_correction_removes_weight_quantization_bias(tmp_path):

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3).eval()
    x = torch.rand(32, 4, 8, 8) + 1.0  # positive mean inputs: weight rounding error shows in the mean
    wq, new_b = _bias_corrected(conv, x, tmp_path)
    with torch.no_grad():
        ref = conv(x)
        plain = nn.functional.conv2d(x, wq, conv.bias)
        corrected = nn.functional.conv2d(x, wq, torch.from_numpy(new_b.copy()))
    bias_plain = (plain - ref).mean((0, 2, 3)).abs().mean()
    bias_fixed = (corrected - ref).mean((0, 2, 3)).abs().mean()
    assert bias_fixed < 0.1 * bias_plain


def test_static_with_equalization_and_bias_correction(tiny_model, tiny_data, make_ctx):
    cfg = QuantizeConfig(equalization=True, bias_correction=True, calibration="percentile", **FAST)
    m = run_quantize(make_ctx(tiny_model, tiny_data), cfg).metrics
    assert m["bias_corrected_layers"] >= 3 and "equalized_pairs" in m
    assert m["calibration"] == "percentile" and m["artifacts"]["onnx_int8"]["agreement"] >= 0.9


def test_config_defaults():
    cfg = QuantizeConfig()
    assert (cfg.mode, cfg.calibration, cfg.per_channel, cfg.backends) == ("static", "minmax", True,
                                                                          ["onnxruntime", "openvino"])
    assert cfg.fallback.max_float_layers == 5 and cfg.fallback.max_steps == 5


def _relu6_net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU6(),
                          nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight[2] *= 20  # large range, and this channel does reach the clip
        model[0].weight[5] *= 0.02  # tiny range that never clips: clip-aware CLE may scale it up
    return model, torch.randn(16, 3, 10, 10, generator=torch.Generator().manual_seed(0))


def test_equalization_relu6_policies(tmp_path):
    from pipeline.export.onnx import export_onnx
    from pipeline.quantization.calibration import StreamingReader
    from pipeline.quantization.equalization import equalize

    model, x = _relu6_net()
    src = export_onnx(model, x[:1], tmp_path / "m.onnx")
    reader = StreamingReader(TensorSplit("x", x, None), "input")
    ref = ort.InferenceSession(str(src)).run(None, {"input": x.numpy()})[0]
    out, pairs, spread = {}, {}, {}
    for policy in ("skip", "exact", "relu"):
        dst, pairs[policy] = equalize(src, tmp_path / f"{policy}.onnx", relu6=policy, reader=reader)
        out[policy] = ort.InferenceSession(str(dst)).run(None, {"input": x.numpy()})[0]
        w0 = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer if list(t.dims) == [8, 3, 3, 3]][0]
        ranges = np.abs(w0).reshape(8, -1).max(1)
        spread[policy] = ranges.max() / ranges.min()
    assert pairs == {"skip": 0, "exact": 2, "relu": 2}
    np.testing.assert_allclose(out["exact"], ref, rtol=1e-4, atol=1e-4)  # exact on the calibration data
    assert np.abs(out["relu"] - ref).max() > 1e-2  # Clip -> Relu changes the function where x > 6
    assert spread["exact"] < 0.5 * spread["skip"] and spread["relu"] < spread["exact"]
    with pytest.raises(ValueError, match="reader"):
        equalize(src, tmp_path / "x.onnx", relu6="exact")


def test_bias_correction_handles_depthwise(tmp_path):

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, groups=6).eval()
    x = torch.rand(32, 6, 8, 8) + torch.arange(6.0).view(1, 6, 1, 1)  # a different mean per channel
    wq, new_b = _bias_corrected(conv, x, tmp_path)
    with torch.no_grad():
        ref = conv(x)
        plain = (nn.functional.conv2d(x, wq, conv.bias, groups=6) - ref).mean((0, 2, 3)).abs().mean()
        fixed = (nn.functional.conv2d(x, wq, torch.from_numpy(new_b.copy()), groups=6) - ref).mean((0, 2, 3)).abs().mean()
    assert fixed < 0.1 * plain


def test_keep_float_presets_name_layers(tmp_path):
    from pipeline.export.onnx import export_onnx
    from pipeline.quantization.ort_quant import keep_float_layers

    model, x = _relu6_net()
    net = nn.Sequential(model, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    path = export_onnx(net, x[:1], tmp_path / "m.onnx")
    convs = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    assert keep_float_layers(path, ["first_conv", "last_conv"]) == [convs[0], convs[-1]]
    assert keep_float_layers(path, ["depthwise"]) == [convs[1]]
    assert len(keep_float_layers(path, ["classifier"])) == 1
    with pytest.raises(BadInput, match="preset"):
        keep_float_layers(path, ["nonsense"])


def test_keep_float_depthwise_in_stage(tmp_path, make_ctx):
    model, x = _relu6_net()
    net = nn.Sequential(model, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    split = TensorSplit("x", x, None, batch_size=8)
    cfg = QuantizeConfig(keep_float=["depthwise"], equalization=True, bias_correction=True, **FAST)
    result = run_quantize(make_ctx(net, DataBundle(calibration=split, eval=split), example_input=x[:1]), cfg)
    graph = onnx.load(str(result.artifacts["onnx_int8"].path)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    dw = next(n for n in graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i == 8 for a in n.attribute))
    assert producers.get(dw.input[1]) != "DequantizeLinear"  # depthwise weight stayed float
    assert result.metrics["keep_float_layers"] == 1 and result.metrics["equalized_pairs"] == 2


def test_qint8_activations_are_symmetric_for_tensorrt(tmp_path, tiny_model, tiny_data, make_ctx):
    """TensorRT reads Q/DQ as-is and needs zero points of 0: activation_type qint8 must give that."""
    from pipeline.export.tensorrt import qdq_incompatibility
    from pipeline.stages.quantize import QuantizeConfig

    ctx = make_ctx(tiny_model, tiny_data)
    res = run_quantize(ctx, QuantizeConfig(activation_type="qint8", backends=["onnxruntime"], samples=32,
                                                  eval_samples=32))
    assert qdq_incompatibility(res.artifacts["onnx_int8"].path) is None


def _bias_corrected(conv: nn.Module, x: torch.Tensor, tmp_path) -> tuple[torch.Tensor, np.ndarray]:
    """Export `conv`, bias-correct it on `x`; return its fake-quantized weight and the new bias."""
    from pipeline.export.onnx import export_onnx
    from pipeline.quantization.bias_correction import correct_biases, fake_quant
    from pipeline.quantization.calibration import StreamingReader

    src = export_onnx(conv, x[:1], tmp_path / "c.onnx", simplify=False)
    dst, n = correct_biases(src, tmp_path / "bc.onnx", StreamingReader(TensorSplit("x", x, None), "input"))
    assert n == 1
    wq = torch.from_numpy(fake_quant(conv.weight.detach().numpy().astype(np.float64)).astype(np.float32))
    new_b = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer if len(t.dims) == 1][0]
    return wq, new_b


def test_quantize_without_export_is_refused_by_validate_with_the_fix(tmp_path):
    from pipeline.recipe import parse_recipe

    text = ("name: t\nmodel: {source: builtin:digits_cnn, input_shape: [1, 1, 32, 32]}\n"
            "data: {calibration: {source: builtin, name: digits, split: calibration}}\n"
            "stages:\n  - profile: {}\n  - quantize: {}\n")
    with pytest.raises(BadInput, match=r"r.yaml:6 stages\[1\]\.quantize: needs the artifact 'onnx_fp32'.*'- export: \{\}' before it"):
        parse_recipe(text, "r.yaml")
    parse_recipe(text.replace("  - quantize: {}", "  - export: {}\n  - quantize: {}"), "r.yaml")  # in order: fine
