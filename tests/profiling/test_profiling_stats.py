"""Streaming per-channel statistics: equal to the all-at-once computation, dead channels found."""

import numpy as np
import pytest
import torch

from pipeline.errors import BadInput
from pipeline.profiling.redundancy import most_redundant, summarize_redundancy
from pipeline.profiling.stats import ChannelStats, collect_channel_stats


def _reference(acts: torch.Tensor) -> dict[str, np.ndarray]:
    """All activations at once: [N, C, H, W] -> per-channel numbers, float64 numpy."""
    a = acts.double().transpose(0, 1).reshape(acts.shape[1], -1).numpy()
    return {"mean_abs": np.abs(a).mean(1), "apoz": (a == 0).mean(1), "variance": a.var(1),
            "corr": np.corrcoef(a), "rank": torch.linalg.matrix_rank(acts[:20].float()).double().mean(0).numpy()}


def test_streaming_equals_all_at_once(tiny_model, tiny_data):
    xs = [x for x, _ in tiny_data.calibration.batches(16)]
    stats = collect_channel_stats(tiny_model, xs, rank_samples=20)
    full = torch.cat(xs)
    with torch.no_grad():
        m = tiny_model
        a = torch.relu(m.bn1(m.conv1(full)))
        b = torch.relu(m.bn2(m.conv2(a)) + a)
        acts = {"conv1": a, "conv2": m.conv2(a), "conv3": torch.relu(m.conv3(b))}
    for name, act in acts.items():
        st, ref = stats.layers[name], _reference(act)
        assert st.samples == 64
        for key in ("mean_abs", "apoz", "variance"):
            np.testing.assert_allclose(getattr(st, key), ref[key], rtol=1e-5, atol=1e-7, err_msg=f"{name}.{key}")
        np.testing.assert_allclose(st.corr, ref["corr"], atol=1e-5)
        np.testing.assert_allclose(st.mean_rank, ref["rank"], atol=1e-9)
    assert stats.layers["conv1"].measured_at == "relu"  # after the functional relu, through bn1
    assert stats.layers["conv2"].measured_at == "conv2"  # bn2 feeds an add: no ReLU of its own
    assert stats.layers["conv1"].apoz.mean() > 0.2 and stats.layers["conv2"].apoz.max() == 0
    assert stats.layers["fc"].mean_rank is None and stats.layers["fc"].corr.shape == (10, 10)


def test_batching_does_not_change_the_result(tiny_model, tiny_data):
    big = collect_channel_stats(tiny_model, [x for x, _ in tiny_data.calibration.batches(64)], rank_samples=0)
    small = collect_channel_stats(tiny_model, tiny_data.calibration.batches(8), rank_samples=0)  # (x, y) tuples
    for name in big.layers:
        for key in ("mean_abs", "apoz", "variance", "corr"):
            np.testing.assert_allclose(getattr(small.layers[name], key), getattr(big.layers[name], key), atol=1e-5)


def test_planted_dead_channel_is_found(tiny_model, tiny_data, tmp_path):
    with torch.no_grad():
        tiny_model.conv1.weight[2] = 0
        tiny_model.conv1.bias[2] = -1.0  # relu(bn(-1)) == 0 for every input
        tiny_model.conv3.weight[5] = 0
        tiny_model.conv3.bias[5] = 0.5  # constant 0.5 after relu: dead too, but no zeros
    stats = collect_channel_stats(tiny_model, tiny_data.calibration.batches(), max_batches=2)
    c1, c3 = stats.layers["conv1"], stats.layers["conv3"]
    assert c1.dead.tolist() == [i == 2 for i in range(8)] and c1.apoz[2] == 1.0
    assert c3.dead[5] and c3.apoz[5] == 0.0 and c3.dead.sum() == 1
    assert c1.samples == 32  # max_batches=2 of 16
    summary = summarize_redundancy(stats)
    assert summary["conv1"]["dead"] == 1 and summary["conv1"]["channels"] == 8
    assert most_redundant(stats) in stats.layers

    path = stats.save(tmp_path / "s.npz")
    loaded = ChannelStats.load(path)
    assert list(loaded.layers) == list(stats.layers)
    for name, st in stats.layers.items():
        ld = loaded.layers[name]
        assert ld.measured_at == st.measured_at and ld.samples == st.samples
        np.testing.assert_array_equal(ld.dead, st.dead)
        np.testing.assert_allclose(ld.apoz, st.apoz)
        np.testing.assert_allclose(ld.corr, st.corr, atol=1e-6)
    assert not list(tmp_path.glob(".*"))  # atomic: no temp files left behind


def test_two_highly_correlated_channels_are_counted(tiny_model, tiny_data):
    with torch.no_grad():
        tiny_model.conv3.weight[1] = tiny_model.conv3.weight[0] * 2  # channel 1 == 2 x channel 0 (pre-relu)
        tiny_model.conv3.bias[1] = tiny_model.conv3.bias[0] * 2
    st = collect_channel_stats(tiny_model, tiny_data.calibration.batches(), layers=["conv3"], rank_samples=0)
    assert list(st.layers) == ["conv3"]
    assert st.layers["conv3"].corr[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert st.layers["conv3"].num_high_corr_pairs >= 1


def test_unknown_layer_is_bad_input(tiny_model, tiny_data):
    with pytest.raises(BadInput, match="nope"):
        collect_channel_stats(tiny_model, tiny_data.calibration.batches(), layers=["nope"])


def test_moments_without_correlation_match(tiny_model, tiny_data):
    xs = [x for x, _ in tiny_data.calibration.batches(16)]
    with_corr = collect_channel_stats(tiny_model, xs, rank_samples=0)
    without = collect_channel_stats(tiny_model, xs, rank_samples=0, correlation=False)
    for name, st in without.layers.items():
        assert st.corr is None and st.num_high_corr_pairs == 0
        for key in ("mean_abs", "apoz", "variance", "dead"):
            np.testing.assert_allclose(getattr(st, key), getattr(with_corr.layers[name], key), rtol=1e-6, atol=1e-9)


def test_accumulators_sharing_scratch_stay_exact():
    """Two layers of different sizes reuse one scratch buffer, batch after batch."""
    from pipeline.profiling.stats import _Accumulator, _Scratch

    torch.manual_seed(0)
    scratch = _Scratch()
    big, small = _Accumulator(1, True, 0, scratch), _Accumulator(-1, True, 0, scratch)
    xb = [torch.randn(4, 3, 5, 5).relu() - 0.3 * (i % 2) for i in range(3)]  # mixed-sign and post-ReLU batches
    xs = [torch.randn(7, 6).relu() for _ in range(3)]
    for b, s in zip(xb, xs):
        big.update(b)
        small.update(s)
    for acc, data in ((big, torch.cat(xb).transpose(0, 1).reshape(3, -1)), (small, torch.cat(xs).T)):
        st, a = acc.finish("x"), data.double().numpy()
        np.testing.assert_allclose(st.mean_abs, np.abs(a).mean(1), rtol=1e-6)
        np.testing.assert_allclose(st.apoz, (a == 0).mean(1), rtol=0, atol=0)
        np.testing.assert_allclose(st.variance, a.var(1), rtol=1e-5)
        np.testing.assert_allclose(st.corr, np.corrcoef(a), atol=1e-5)
