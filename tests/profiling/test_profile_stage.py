"""The profile stage end to end on the tiny model, and `fmap profile` through Click."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.profiling import summarize
from pipeline.profiling.stats import ChannelStats
from pipeline.sources.data import DataBundle
from pipeline.stages import get_stage
from pipeline.stages.profile import ProfileConfig, ProfileStage


def test_stage_metrics_and_artifacts(tiny_model, tiny_data, make_ctx):
    ctx = make_ctx(tiny_model, tiny_data)
    stage = get_stage("profile")
    assert stage is ProfileStage
    result = stage().run(ctx, ProfileConfig(batch_size=4, max_batches=2))
    m = result.metrics
    json.dumps(m)  # JSON-serialisable as the runner needs
    row = next(r for r in m["layers"] if r["name"] == "conv3")
    assert row["output_shape"] == [4, 16, 8, 8] and row["channels"] == 16 and row["volume"] == 16 * 64
    assert row["params"] == (3 * 3 * 8 + 1) * 16 and row["receptive_field"] == 7 and row["stride"] == 2
    assert m["totals"]["params"] == sum(p.numel() for p in tiny_model.parameters())
    mem = m["memory"]
    assert mem["batch_size"] == 4 and mem["liveness_peak_per_sample_bytes"] * 4 == mem["liveness_peak_bytes"]
    assert abs(mem["liveness_peak_bytes"] - mem["measured_peak_bytes"]) <= 0.05 * mem["measured_peak_bytes"]
    assert mem["naive_sum_bytes"] > mem["liveness_peak_bytes"] and mem["alive_at_peak"]
    assert m["timeline"][0][0] == "conv1" and max(b for _, b in m["timeline"]) == mem["liveness_peak_bytes"]
    assert set(m["redundancy"]) == {"conv1", "conv2", "conv3", "fc"}
    assert m["redundancy"]["conv1"]["channels"] == 8 and m["redundancy"]["conv1"]["samples"] == 32
    kinds = {name: a.kind for name, a in result.artifacts.items()}
    assert kinds["profile_stats"] == "stats" and kinds["profile_json"] == "report"
    assert {"plot_layer_memory", "plot_memory_timeline", "plot_redundancy", "plot_correlation"} <= set(kinds)
    for a in result.artifacts.values():
        assert a.path.exists() and a.path.stat().st_size > 0
    assert set(ChannelStats.load(result.artifacts["profile_stats"].path).layers) == set(m["redundancy"])
    assert json.loads(result.artifacts["profile_json"].path.read_text())["memory"] == mem


def test_stage_without_calibration_data_still_profiles(tiny_model, make_ctx):
    ctx = make_ctx(tiny_model, DataBundle(), example_input=torch.randn(1, 1, 16, 16))
    result = ProfileStage().run(ctx, ProfileConfig(plots=False, measure=False))
    assert result.metrics["redundancy"] == {} and "profile_stats" not in result.artifacts
    assert result.metrics["memory"]["measured_peak_bytes"] is None


def test_config_forbids_unknown_keys():
    with pytest.raises(Exception, match="extra"):
        ProfileConfig(redundancy=True, bogus=1)


def test_summarize_for_prune(tiny_model):
    s = summarize(tiny_model, torch.randn(1, 1, 16, 16))
    assert s["params"] == sum(p.numel() for p in tiny_model.parameters())
    assert s["macs"] > 0 and s["liveness_peak_bytes"] > 0
    smaller = type(tiny_model)()
    smaller.conv3 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
    smaller.fc = torch.nn.Linear(8, 10)
    assert summarize(smaller.eval(), torch.randn(1, 1, 16, 16))["macs"] < s["macs"]


def test_cli_profile_command(tmp_path, monkeypatch, tiny_model):
    import pipeline.sources.models as models
    from pipeline.commands.profile import profile

    monkeypatch.setattr(models, "build_model", lambda cfg, log=None: tiny_model)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((20, 1, 16, 16)).astype(np.float32))
    out = tmp_path / "out"
    res = CliRunner().invoke(profile, ["python:x.y:z", "--input-shape", "1,1,16,16", "--data", str(data),
                                       "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout.strip().splitlines()[-1])
    assert payload["memory"]["liveness_peak_bytes"] > 0 and payload["redundancy"]["conv1"]["samples"] == 20
    assert (out / "profile" / "profile.json").exists() and (out / "profile" / "profile.md").exists()
    assert "liveness peak" in res.stderr and "naive sum" in res.stderr


def test_cli_profile_bad_data_path(tmp_path):
    from pipeline.commands.profile import profile
    from pipeline.errors import BadInput

    res = CliRunner().invoke(profile, ["builtin:digits_cnn", "--data", str(tmp_path / "missing.npz")])
    assert isinstance(res.exception, BadInput) and "missing.npz" in str(res.exception)
