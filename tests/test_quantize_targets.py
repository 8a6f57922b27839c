"""Target-aware INT8: CPU detection, the static int16 saturation check, the 7-bit overflow fix, the
fallback that never returns a worse model, and bad calibration data. Nothing here depends on the
CPU running the tests: targets are named explicitly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from pipeline.errors import BadInput
from pipeline.quantization import saturation, targets
from pipeline.quantization.fallback import run_fallback
from pipeline.sources.data import DataBundle, TensorSplit
from pipeline.stages.quantize import QuantizeConfig
from conftest import run_quantize  # tests/ is on sys.path (rootdir conftest)

FAST = {"backends": ["onnxruntime"], "latency_iterations": 2, "eval_samples": 32, "samples": 32}


class StemNet(nn.Module):
    """A stem conv whose weights are all large and positive on bright, correlated RGB input: every
    adjacent u8 x s8 pair reaches 2 * 255 * 127, twice int16's range. Then a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.stem.weight.uniform_(0.5, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(torch.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def stem_setup():
    torch.manual_seed(0)
    model = StemNet().eval()
    x = torch.rand(48, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 2.0
    split = TensorSplit("bright", x, None, batch_size=16)
    return model, DataBundle(calibration=split, eval=split)


def _weights(path: Path, node_prefix: str) -> np.ndarray:
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith(node_prefix))
    return numpy_helper.to_array(inits[producer[conv.input[1]].input[0]])


def test_target_from_flags_covers_every_x86_generation():
    assert targets.target_from_flags({"avx2", "fma"}) == "x86-avx2"
    assert targets.target_from_flags({"avx2", "avx512f"}) == "x86-avx2"  # AVX-512 without VNNI saturates too
    assert targets.target_from_flags({"avx2", "avx512f", "avx512_vnni"}) == "x86-vnni"
    assert targets.target_from_flags({"avx2", "avx_vnni"}) == "x86-vnni"
    assert targets.target_from_flags({"avx2", "avx512_vnni", "amx_int8"}) == "x86-amx"
    assert targets.target_from_flags({"asimd"}, machine="aarch64") == "arm64"
    assert targets.needs_overflow_fix("x86-avx2") and not targets.needs_overflow_fix("x86-vnni")


def test_measurable_here_only_when_kernels_agree():
    assert targets.measurable_here("x86-vnni", False, host="x86-amx")  # both int32 accumulation
    assert not targets.measurable_here("x86-avx2", False, host="x86-vnni")  # saturation not reproduced
    assert targets.measurable_here("x86-avx2", True, host="x86-vnni")  # no pair can saturate: identical
    assert targets.measurable_here("x86-vnni", True, host="x86-avx2")
    assert not targets.measurable_here("arm64", True, host="x86-vnni")
    assert not targets.measurable_here("tensorrt", True, host="x86-avx2")


def test_vnni_target_keeps_8bit_and_flags_the_stem_at_risk(stem_setup, make_ctx):
    model, data = stem_setup
    result = run_quantize(make_ctx(model, data), QuantizeConfig(**FAST, target="x86-vnni"))
    tgt = result.metrics["target"]
    sat = tgt["saturation"]
    assert tgt["resolved"] == "x86-vnni" and tgt["seven_bit_weights"] == []
    assert not sat["safe_without_vnni"] and tgt["safe_on"] == ["x86-vnni", "x86-amx"]
    stem = next(layer for layer in sat["layers"] if layer["layer"].startswith("/stem/"))
    assert stem["at_risk_without_vnni"] and stem["ratio"] > 1.5 and stem["weight_bits"] == 8
    dw = next(layer for layer in sat["layers"] if layer["layer"].startswith("/dw/"))
    assert dw["kernel"] == "depthwise" and not dw["at_risk_without_vnni"]
    assert int(np.abs(_weights(result.artifacts["onnx_int8"].path, "/stem/")).max()) == 127


def test_avx2_target_widens_only_the_channels_at_risk(stem_setup, make_ctx, tmp_path):
    model, data = stem_setup
    vnni = run_quantize(make_ctx(model, data, run_dir=tmp_path / "vnni"), QuantizeConfig(**FAST, target="x86-vnni"))
    result = run_quantize(make_ctx(model, data, run_dir=tmp_path / "avx2"), QuantizeConfig(**FAST, target="x86-avx2"))
    tgt = result.metrics["target"]
    assert tgt["saturation"]["safe_without_vnni"] and tgt["saturation"]["worst_ratio"] <= 1.0
    assert tgt["safe_on"] == ["x86-avx2", "x86-vnni", "x86-amx"] and tgt["seven_bit_weights"] == []
    before = {r["layer"]: r for r in vnni.metrics["target"]["saturation"]["layers"]}
    assert set(tgt["widened_channels"]) == {k for k, r in before.items() if r["at_risk_without_vnni"]}
    assert any(k.startswith("/stem/") for k in tgt["widened_channels"]) and "/dw/Conv" not in tgt["widened_channels"]
    for layer, widened in tgt["widened_channels"].items():  # exactly the channels at risk, no others
        assert widened["channels"] == before[layer]["channels_at_risk"] and 1.0 < widened["max_factor"] < 2.5
    path = result.artifacts["onnx_int8"].path
    assert 64 < int(np.abs(_weights(path, "/stem/")).max()) <= 127  # more than 7 bits kept
    assert np.array_equal(_weights(path, "/dw/"), _weights(vnni.artifacts["onnx_int8"].path, "/dw/"))
    assert result.metrics["artifacts"]["onnx_int8"]["agreement"] >= 0.9


def test_saturation_bound_is_exact_for_a_known_pair(tmp_path, stem_setup):
    """Hand-check the bound: with every weight of the stem positive, the worst pair for any input is
    255 x (the largest adjacent weight pair) over both K orders; calibrated inputs come no closer."""
    from pipeline.export.onnx import INPUT_NAME, export_onnx
    from pipeline.quantization import ort_quant
    from pipeline.quantization.calibration import StreamingReader

    model, data = stem_setup
    fp32 = tmp_path / "m.onnx"
    export_onnx(model, data.calibration.x[:1], fp32, dynamic_batch=True)
    reader = StreamingReader(data.calibration, INPUT_NAME, 48)
    q = ort_quant.quantize_static_qdq(fp32, tmp_path / "q.onnx", reader)
    stem = next(r for r in saturation.check(q, saturation.activation_ranges(fp32, reader))
                if r.layer.startswith("/stem/"))
    w = _weights(q, "/stem/").astype(np.int64)  # [8, 3, 3, 3], all >= 0
    expected = 0
    for order in [(0, 2, 3, 1), (0, 1, 2, 3)]:
        flat = np.concatenate([w.transpose(order).reshape(8, -1), np.zeros((8, 1), np.int64)], 1)
        expected = max(expected, int((255 * flat[:, :28].reshape(8, 14, 2).sum(-1)).max()))
    assert stem.worst_pos == expected and stem.worst_pos > 32767 and stem.worst_neg == 0
    assert 1.0 < stem.observed_ratio <= stem.ratio  # bright inputs do reach the danger zone


def test_unmeasurable_target_with_a_fallback_target_is_refused_at_validation():
    if targets.host_cpu().target == "arm64":
        pytest.skip("this machine is arm64: the target is measurable here")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="target arm64 cannot be measured"):
        QuantizeConfig(**FAST, target="arm64", fallback={"min_agreement": 0.9})
    QuantizeConfig(**FAST, target="arm64")  # without a fallback target it is fine: marked not measured


def test_unmeasurable_target_without_fallback_is_marked_not_measured(stem_setup, make_ctx):
    if targets.host_cpu().target == "arm64":
        pytest.skip("this machine is arm64")
    model, data = stem_setup
    tgt = run_quantize(make_ctx(model, data), QuantizeConfig(**FAST, target="arm64")).metrics["target"]
    assert tgt["resolved"] == "arm64" and tgt["measured_on_target"] is False


@pytest.mark.parametrize("bad", ["nan", "inf", "empty"])
def test_bad_calibration_data_is_bad_input_naming_the_key(bad, stem_setup, make_ctx):
    model, data = stem_setup
    x = data.calibration.x.clone()
    if bad == "empty":
        x = x[:0]
    else:
        x[5, 0, 0, 0] = float("nan") if bad == "nan" else float("inf")
    calib = TensorSplit("calib", x, None, batch_size=16)
    ctx = make_ctx(model, DataBundle(calibration=calib, eval=data.eval), example_input=data.eval.x[:1])
    with pytest.raises(BadInput, match=r"data\.calibration: "):
        run_quantize(ctx, QuantizeConfig(**FAST, target="x86-avx2"))


class _Err:
    def __init__(self, layer: str) -> None:
        self.layer = layer


def test_fallback_undoes_a_step_that_makes_things_worse(tmp_path):
    """Every candidate lowers agreement: the fallback must return step 0 and say the step was undone."""
    quality = {"0": 0.80}

    def quantize(exclude, tag):
        quality[tag] = 0.70 if exclude else 0.80
        return tmp_path / f"m{tag}.onnx"

    outcome = run_fallback(
        expand=lambda layer: [layer], first=tmp_path / "m0.onnx", first_scores={"agreement": 0.80},
        quantize=quantize, evaluate=lambda p: {"agreement": quality[p.stem[1:]]},
        meets=lambda s: s["agreement"] >= 0.95, errors=lambda p: [_Err("A"), _Err("B")],
        base_exclude=[], max_float_layers=3, max_steps=3)
    assert outcome.path.name == "m0.onnx" and outcome.chosen_step == 0 and outcome.float_layers == []
    assert outcome.steps[1]["accepted"] is False and len(outcome.steps[1]["tried"]) == 2
    assert not outcome.met


def test_fallback_picks_the_candidate_that_measures_best_not_the_debuggers_first(tmp_path):
    """The debugger ranks A first, but keeping B in float is what helps on the deployable session."""
    def quantize(exclude, tag):
        return tmp_path / ("B" if "B" in exclude else "A" if "A" in exclude else "none")

    scores = {"A": 0.80, "B": 0.97, "none": 0.80}
    outcome = run_fallback(
        expand=lambda layer: [layer], first=tmp_path / "none", first_scores={"agreement": 0.80},
        quantize=quantize, evaluate=lambda p: {"agreement": scores[p.name]},
        meets=lambda s: s["agreement"] >= 0.95, errors=lambda p: [_Err("A"), _Err("B")],
        base_exclude=[], max_float_layers=3, max_steps=3)
    assert outcome.float_layers == ["B"] and outcome.met and outcome.chosen_step == 1


def test_range_search_clips_heavy_tails_where_it_lowers_the_error():
    """Laplace activations: the MSE-optimal 8-bit clip sits near 10 scale units (Banner et al.),
    inside the min-max range; a uniform tensor has nothing worth clipping."""
    from pipeline.quantization.range_search import BINS, _expected_mse, best_range

    rng = np.random.default_rng(0)
    t = rng.laplace(0, 1, 400_000)
    lo, hi = float(t.min()), float(t.max())
    hist, edges = np.histogram(t, bins=BINS, range=(lo, hi))
    new_lo, new_hi = best_range(hist, lo, hi)
    centres = (edges[:-1] + edges[1:]) / 2
    assert lo < new_lo < -8 and 8 < new_hi < hi
    assert _expected_mse(hist, centres, new_lo, new_hi) < 0.85 * _expected_mse(hist, centres, lo, hi)
    flat = rng.uniform(0, 6, 100_000)
    hist, _ = np.histogram(flat, bins=BINS, range=(0.0, 6.0))
    lo, hi = best_range(hist, 0.0, 6.0)
    assert lo == 0.0 and hi > 5.9


def test_mse_calibration_runs_through_the_stage(stem_setup, make_ctx):
    model, data = stem_setup
    m = run_quantize(make_ctx(model, data), QuantizeConfig(**FAST, calibration="mse")).metrics
    assert m["calibration"] == "mse" and m["range_search"]["tensors"] >= 3
    assert m["artifacts"]["onnx_int8"]["agreement"] >= 0.9



def test_gptq_rounding_lowers_layer_output_error_and_keeps_agreement(stem_setup, make_ctx, tmp_path):
    model, data = stem_setup
    near = run_quantize(make_ctx(model, data, run_dir=tmp_path / "near"), QuantizeConfig(**FAST, target="x86-vnni"))
    ada = run_quantize(make_ctx(model, data, run_dir=tmp_path / "gptq"),
                              QuantizeConfig(**FAST, target="x86-vnni", weight_rounding="gptq"))
    layers = ada.metrics["gptq"]
    assert len(layers) >= 2 and all(v["mse_gptq"] <= v["mse_nearest"] for v in layers.values())
    assert any(v["mse_gptq"] < 0.8 * v["mse_nearest"] for v in layers.values())
    w_near = _weights(near.artifacts["onnx_int8"].path, "/stem/").astype(int)
    w_gptq = _weights(ada.artifacts["onnx_int8"].path, "/stem/").astype(int)
    assert (w_gptq != w_near).any() and np.abs(w_gptq).max() <= 127
    assert ada.metrics["artifacts"]["onnx_int8"]["agreement"] >= 0.9


def test_gptq_beats_nearest_on_correlated_inputs():
    """The textbook case: correlated inputs make rounding errors add up; compensation cancels them."""
    from pipeline.quantization import gptq

    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (8, 27)).astype(np.float32)
    scale = (np.abs(w).max(1) / 127).astype(np.float32)
    codes = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
    x = rng.normal(0, 1, (4096, 1, 27)).astype(np.float32)
    for part in (slice(9, 18), slice(18, 27)):  # three nearly identical copies of nine inputs
        x[:, :, part] = x[:, :, :9] + 0.05 * rng.normal(0, 1, (4096, 1, 9))
    res = gptq._round({"w": w, "scale": scale, "group": 1, "codes": codes, "name": "L"}, x, "nearest")
    assert res.mse_learned < 0.5 * res.mse_nearest


@pytest.mark.parametrize("calibration", ["entropy", "percentile"])
def test_histogram_calibration_with_a_short_last_batch(calibration, stem_setup, make_ctx):
    """onnxruntime's histogram calibrators stack batches and failed on 45 samples in batches of 16."""
    model, data = stem_setup
    calib = TensorSplit("calib", data.calibration.x[:45], None, batch_size=16)
    ctx = make_ctx(model, DataBundle(calibration=calib, eval=data.eval))
    cfg = QuantizeConfig(**{**FAST, "samples": 45}, calibration=calibration, target="x86-vnni")
    assert run_quantize(ctx, cfg).metrics["artifacts"]["onnx_int8"]["agreement"] >= 0.8


def test_uniform_reader_keeps_every_sample_when_a_divisor_exists():
    from pipeline.quantization.calibration import StreamingReader

    split = TensorSplit("s", torch.zeros(45, 1, 2, 2), None, batch_size=16)
    sizes = [len(b["input"]) for b in StreamingReader(split, "input", 45, uniform=True)]
    assert sizes == [15, 15, 15]
    split = TensorSplit("s", torch.zeros(179, 1, 2, 2), None, batch_size=32)  # 179 is prime
    sizes = [len(b["input"]) for b in StreamingReader(split, "input", None, uniform=True)]
    assert set(sizes) == {32} and sum(sizes) == 160


def test_calibration_cache_does_not_outlive_the_stage(stem_setup, make_ctx, tmp_path):
    model, data = stem_setup
    run_quantize(make_ctx(model, data, run_dir=tmp_path / "run"), QuantizeConfig(**FAST, target="x86-vnni"))
    assert not list((tmp_path / "run").rglob(".calibration.*"))
