"""QAT (quantize.method: qat) and the pass chain: the torch simulation rounds where the QDQ file
rounds, trained weights go back into the same float file exactly, and QAT never ships worse than PTQ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from pipeline.export.onnx import INPUT_NAME, export_onnx
from pipeline.quantization import ort_quant, qat
from pipeline.quantization.calibration import StreamingReader
from pipeline.quantization.qat_placement import locate, quantized_tensors, quantized_weights
from pipeline.sources.data import DataBundle, TensorSplit
from pipeline.stages.quantize import QuantizeConfig
from conftest import run_quantize  # tests/ is on sys.path (rootdir conftest)


class Block(nn.Module):
    """Depthwise-separable residual block with ONE activation module called twice (as
    EfficientNet-Lite does): placement must tell the two calls apart."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.pw(self.act(self.bn1(self.dw(self.act(x))))))


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block = Block(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.bn(self.stem(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A SmallNet with non-trivial BN statistics, its float/prep files and a calibrated QDQ file."""
    torch.manual_seed(0)
    model = SmallNet()
    x = torch.randn(48, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(x)
        model.bn.weight.mul_(-1.5)  # a negative BN scale: folding flips that channel's sign
    model.eval()
    return _calibrated(model, x, tmp_path_factory.mktemp("qat"))


def _calibrated(model: nn.Module, x: torch.Tensor, work: Path) -> tuple:
    """(model, images, their split, the float prep file, the calibrated QDQ file)."""
    prep = ort_quant.preprocess(export_onnx(model, x[:1], work / "fp32.onnx"), work / "prep.onnx")
    split = TensorSplit("calib", x, None, batch_size=16)
    qdq = ort_quant.quantize_static_qdq(prep, work / "qdq.onnx", StreamingReader(split, INPUT_NAME, 48))
    return model, x, split, prep, qdq


@pytest.fixture(scope="module")
def sharp(small, tmp_path_factory):
    """SmallNet with large logits (a KL to the float model that QAT can lower) and an all-zero stem
    channel (it must stay zero: its BN factor is unknown), for the distributed QAT tests."""
    import copy

    model = copy.deepcopy(small[0])
    with torch.no_grad():
        model.head.weight.mul_(30.0)
        model.stem.weight[3].zero_()
    return _calibrated(model, small[1], tmp_path_factory.mktemp("sharp"))


def _run(path: Path, x: torch.Tensor, optimise: bool = False) -> np.ndarray:
    opts = ort.SessionOptions()
    if not optimise:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # QDQ simulated in float
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {INPUT_NAME: x.numpy()})[0]


def _placement(model, x, prep, qdq):
    proto = onnx.load(str(qdq))
    placement = locate(model, prep, quantized_tensors(proto), x[:2])
    placement.weights = quantized_weights(proto, model)
    return placement


def test_every_quantized_tensor_and_weight_is_found_in_torch(small):
    model, x, _, prep, qdq = small
    placement = _placement(model, x, prep, qdq)
    proto = onnx.load(str(qdq))
    assert placement.unmatched == []
    assert len(placement.activations) == len(quantized_tensors(proto))
    assert {w.module for w in placement.weights} == {"stem", "block.dw", "block.pw", "head"} - (
        set() if any(n.op_type == "Gemm" and n.name.startswith("/head") for n in proto.graph.node) else {"head"})
    calls = {(p.module, p.call) for p in placement.activations if p.module == "block.act"}
    assert calls == {("block.act", 0), ("block.act", 1)}  # the shared ReLU6, both calls


def test_fake_quant_torch_model_computes_what_the_qdq_file_computes(small):
    model, x, _, prep, qdq = small
    student, _ = qat.prepare(model, onnx.load(str(prep)), _placement(model, x, prep, qdq))
    with torch.no_grad():
        simulated = student(x).numpy()
    onnx_qdq, fp32 = _run(qdq, x), model(x).detach().numpy()
    # the same roundings up to rare one-step flips (float summation order, int32 bias codes)
    gap, int8_error = ((simulated - onnx_qdq) ** 2).mean(), ((fp32 - onnx_qdq) ** 2).mean()
    assert gap < 0.1 * int8_error, (gap, int8_error)
    assert int8_error > 1e-7  # the check above is not vacuous


def test_trained_weights_are_written_back_into_the_same_float_file(small, tmp_path):
    model, x, _, prep, qdq = small
    float_onnx = onnx.load(str(prep))
    student, plan = qat.prepare(model, float_onnx, _placement(model, x, prep, qdq))
    assert set(plan["layers"]) >= {"stem", "block.dw", "block.pw"}
    with torch.no_grad():  # stand-in for training: perturb every trainable tensor
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    trained = student.release()
    assert not any(hasattr(m, "parametrizations") for m in trained.modules())
    out = qat.write_back(trained, plan, float_onnx, tmp_path / "prep_qat.onnx")
    with torch.no_grad():
        expected = trained(x).numpy()
    assert np.abs(_run(out, x) - expected).max() < 1e-4 * (np.abs(expected).max() + 1)
    names = [n.name for n in onnx.load(str(out)).graph.node]
    assert names == [n.name for n in float_onnx.graph.node]  # same graph: the calibration cache applies


def test_bn_statistics_stay_frozen_during_training(small):
    model, x, _, prep, qdq = small
    student, _ = qat.prepare(model, onnx.load(str(prep)), _placement(model, x, prep, qdq))
    before = student.model.bn.running_mean.clone()
    student.train()
    student(x).sum().backward()
    assert torch.equal(student.model.bn.running_mean, before)
    assert student.model.bn.weight.grad is None  # BN parameters are not trained (folded in the file)
    assert student.model.stem.parametrizations.weight.original.grad is not None


def test_qat_stage_never_ships_worse_than_ptq(small, make_ctx):
    model, x, split, _, _ = small
    ctx = make_ctx(model, DataBundle(calibration=split, eval=split))
    cfg = QuantizeConfig(method="qat", qat={"steps": 6, "eval_every": 3, "augment": None}, backends=["onnxruntime"],
                         latency_iterations=1, eval_samples=48, samples=48)
    metrics = run_quantize(ctx, cfg).metrics
    q = metrics["qat"]
    assert q["placement"]["unmatched_activations"] == [] and q["steps_run"] == 6
    assert {"qat", "bias_correction"} <= set(metrics["passes"])  # QAT competes with the corrected PTQ file
    final = metrics["artifacts"]["onnx_int8"]["agreement"]
    assert final >= q["ptq"]["agreement"] - 1e-9
    assert q["kept"] == ((q["qat"]["agreement"], q["qat"]["sqnr_db"]) > (q["ptq"]["agreement"], q["ptq"]["sqnr_db"]))


@pytest.mark.parametrize("extra, key", [({"equalization": True}, "equalization"),
                                        ({"weight_rounding": "gptq"}, "gptq"),
                                        ({"mode": "dynamic"}, "mode: static")])
def test_qat_refuses_combinations_it_would_undo(extra, key):
    with pytest.raises(ValidationError, match=key):
        QuantizeConfig(method="qat", **extra)


def test_pass_chain_order_and_a_new_pass_is_one_registration(monkeypatch):
    from pipeline.quantization import passes

    names = [p.name for p, _ in passes.chain(QuantizeConfig())]
    assert names == ["preprocess", "bias_correction", "keep_float", "range_setting", "emission", "fallback"]
    assert [p.name for p, _ in passes.chain(QuantizeConfig(method="qat", equalization=False))][:5] == [
        "preprocess", "bias_correction", "keep_float", "range_setting", "qat"]

    class Marker(passes.QuantPass[str]):
        name, order = "marker", 45

        def configure(self, stage_cfg):
            return "on"

        def run(self, state, config):
            state.metrics["marker"] = config

    monkeypatch.setitem(passes.PASSES, "marker", Marker)
    names = [p.name for p, _ in passes.chain(QuantizeConfig())]
    assert names.index("marker") == names.index("keep_float") + 1


def _qat_run(sharp, make_ctx, run_dir: Path, nproc: int) -> dict:
    """The QAT stage in 1 process or under a 2-process gloo session (as `fmap run --nproc 2`)."""
    from pipeline.pruning import distributed

    ctx = make_ctx(sharp[0], DataBundle(calibration=sharp[2], eval=sharp[2]), run_dir=run_dir)
    cfg = QuantizeConfig(method="qat", qat={"steps": 8, "eval_every": 4, "lr": 2e-4, "temperature": 1.0,
                                            "augment": None},
                         backends=["onnxruntime"], latency_iterations=1, eval_samples=48, samples=48)
    with distributed.session(nproc, threads=2):
        return run_quantize(ctx, cfg).metrics["qat"]


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_qat_stage_on_two_processes_matches_one_and_rank_0_alone_writes(sharp, make_ctx, tmp_path):
    """DDP averages the gradients of two half batches and QAT's BatchNorm is frozen, so 2 gloo
    processes take the steps 1 takes, up to float summation order, which fake quantization (not
    continuous) can turn into a flipped weight code. Tolerance: held-out KL within 5% (+2e-6, it is
    reported to 6 decimals), agreement within 1e-3, written weights within 5% of how far training
    moved them. Measured: identical curves, weights 4e-7 of the movement apart; with DDP off (each
    rank on its half alone) the KL is 39% off. Only rank 0 runs the stage: both run directories hold
    the same files."""
    one, two = _qat_run(sharp, make_ctx, tmp_path / "n1", 1), _qat_run(sharp, make_ctx, tmp_path / "n2", 2)
    assert "distributed" not in one and two["distributed"]["world_size"] == 2
    for a, b in zip(one["curve"], two["curve"], strict=True):
        assert a["step"] == b["step"] and abs(a["agreement"] - b["agreement"]) <= 1e-3, (a, b)
        assert abs(a["kl"] - b["kl"]) <= 0.05 * a["kl"] + 2e-6, (a, b)  # KL is reported to 6 decimals
    assert two["steps_run"] == one["steps_run"] == 8 and two["best_step"] == one["best_step"] > 0
    base = _initializers(tmp_path / "n1" / "quantize" / "prep.onnx")
    w1, w2 = (_initializers(tmp_path / d / "quantize" / "prep_qat.onnx") for d in ("n1", "n2"))
    moved = max(float(np.abs(w - base[n]).max()) for n, w in w1.items())
    gap = max(float(np.abs(w - w2[n]).max()) for n, w in w1.items())
    assert moved > 1e-4 and gap <= 0.05 * moved, (gap, moved)
    listing = [sorted(p.relative_to(d).as_posix() for p in d.rglob("*")) for d in (tmp_path / "n1", tmp_path / "n2")]
    assert listing[0] == listing[1]


def test_each_rank_builds_its_student_from_the_picklable_source(sharp):
    """The fake-quantized student does not pickle; workers get the float model and `build_student`
    and make their own, with the same frozen tensors and gradient masks: after 2-process training
    rank 0's student equals a 1-process one, and the all-zero channel is still zero (a worker that
    trained it would move rank 0's through the averaged gradient)."""
    import functools

    from pipeline.pruning import distributed
    from pipeline.pruning.finetune import FinetuneSettings, finetune

    model, x, split, prep, qdq = sharp
    placement, float_onnx = _placement(model, x, prep, qdq), onnx.load(str(prep))
    settings = FinetuneSettings(steps=4, lr=1e-3, optimizer="adam", distill=True, alpha=1.0, temperature=1.0)
    students = []
    for nproc in (1, 2):
        student, plan = qat.prepare(model, float_onnx, placement)
        build = functools.partial(qat.build_student, layers=plan["layers"], placement=placement)
        with distributed.session(nproc, threads=2):
            distributed.train(finetune, student, model, split, None, settings, source=(model, build))
        students.append(student)
    assert np.isnan(plan["layers"]["stem"][2][3])  # the zeroed channel is known dead
    originals = [s.model.stem.parametrizations.weight.original for s in students]
    assert not originals[1][3].any() and (originals[1] - model.stem.weight).abs().max() > 1e-4
    for (name, a), b in zip(students[0].state_dict().items(), students[1].state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
