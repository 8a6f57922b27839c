"""fmap sweep --exact (the default): every trial phase on its recipe's own `threads`, so each trial
is byte for byte its single `fmap run`; by default cores // threads trials at once, an explicit
--workers above that shares the cores, and latency is timed with the other trials paused
(pipeline.quiet). (Bad combinations with --build-threads:
tests/sweep/test_sweep.py::test_bad_input_exits_2_before_any_trial.)"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import BadInput
from pipeline.sweep import report
from pipeline.fingerprint import stage_chain
from pipeline.sweep.driver import _prefix_waves, _spread, _tasks, plan_sweep

ROOT = Path(__file__).resolve().parents[2]

# threads: 2 and a 2-epoch fine-tune with an INT8 fallback: measured, this recipe's pruned.pt and
# model_int8.onnx differ between threads 1 and 2, so a phase on the wrong thread count shows.
PRUNE_RECIPE = """
name: tiny-exact-sweep
seed: 0
threads: 2
model: {source: "builtin:digits_cnn", input_shape: [1, 1, 32, 32]}
data:
  calibration: {source: builtin, split: calibration, batch_size: 32, samples: 32}
  eval: {source: builtin, split: test, batch_size: 64, samples: 128}
  train: {source: builtin, split: train, batch_size: 64}
stages:
  - prune:
      criterion: activation
      target: macs
      amount: 0.5
      finetune: {epochs: 2, lr: 0.01, optimizer: sgd, distill: true}
  - export: {}
  - quantize: {mode: static, calibration: minmax, target: x86-avx2, fallback: {max_accuracy_drop: 0.005}}
  - verify:
      backends: [onnxruntime]
      latency: {batch_sizes: [1], warmup: 1, iterations: 5}
      gates: {min_agreement: 0.0}
"""
GRID = ("--grid", "stages.prune.amount=0.4,0.5")  # two fine-tunes side by side
QUANT_GRID = ("stages.quantize.calibration=minmax,percentile",)  # prune/export shared: one prefix task


@pytest.fixture
def prune_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "prune.yaml"
    path.write_text(PRUNE_RECIPE)
    return path


def _result(run_dir: Path) -> dict:
    """What must not depend on how the run was scheduled (benchmarks/sweep.py compares the same),
    plus the artifacts' sha256."""
    rep = json.loads((run_dir / "report.json").read_text())
    stages = {s["id"]: s.get("metrics", {}) for s in rep["stages"]}
    return {
        "rows": sorted((r["artifact"], r["backend"], r["top1"], r["agreement"], r["size_bytes"])
                       for r in rep["artifacts"]),
        "channels": [(la["name"], la["channels_after"]) for la in stages["prune"].get("layers", [])],
        "float_layers": stages["quantize"].get("fallback", {}).get("float_layers"),
        "sha256": {n: hashlib.sha256((run_dir / n).read_bytes()).hexdigest()
                   for n in ("pruned.pt", "model_fp32.onnx", "model_int8.onnx")},
    }


@pytest.mark.slow  # 65 s: keeps the default suite under 10 minutes on the slower CI CPUs
def test_exact_sweep_trials_equal_their_single_runs(prune_recipe, tmp_path):
    """2 workers x threads 2 (on 2 cores: sharing them): each trial one `fmap run` on 2 threads,
    timing with the other paused, and each equals a single `fmap run` of its overrides. (Measured:
    with --no-exact on 2 cores the fine-tune runs on 1 thread and neither trial equals its single run.)"""
    out = tmp_path / "sweep"
    res = CliRunner().invoke(cli, ["sweep", str(prune_recipe), *GRID, "--workers", "2", "--out", str(out)],
                             standalone_mode=False)
    assert res.exception is None, res.output
    assert "2 worker(s), each on its recipe's threads (exact), latency measured with the others paused" in res.output
    data = json.loads((out / "sweep.json").read_text())
    assert data["executor"]["exact"] is True and data["executor"]["workers"] == 2
    assert data["executor"]["timing"] == "others paused while each trial times"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for t in data["trials"]:
        assert t["status"] == "ok" and [p["phase"] for p in t["phases"]] == ["full"]
        log = (out / t["run_dir"] / "sweep.log").read_text()
        assert "=== sweep phase 'full', 2 thread(s)" in log
        rep = json.loads((out / t["run_dir"] / "report.json").read_text())
        conditions = next(s for s in rep["stages"] if s["id"] == "verify")["metrics"]["machine"]["conditions"]
        assert conditions["1"]["paused_trials"] in (0, 1)  # the other trial paused, or already finished
        single = tmp_path / "single" / t["id"]
        sets = [a for o in t["overrides"] for a in ("--set", o)]
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(prune_recipe), *sets,
                               "--out", str(single)], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert _result(out / t["run_dir"]) == _result(single)


def _plan(recipe: Path, out: Path, **kw):
    return plan_sweep(recipe, out, kw.pop("grids", GRID[1:]), **kw)


@pytest.mark.parametrize("cores, workers, expect_workers, shared", [(2, 2, 2, True), (4, 2, 2, False),
                                                                    (4, None, 2, False), (2, None, 1, False),
                                                                    (1, 3, 3, True)])
def test_exact_plan_workers(prune_recipe, tmp_path, monkeypatch, cores, workers, expect_workers, shared):
    """Unasked, as many trials as the cores fit at the recipe's threads; asked for more, they share
    the cores (said in one line) and time with the others paused."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    plan = _plan(prune_recipe, tmp_path / "s", workers=workers)
    assert plan.exact and plan.workers == expect_workers and plan.threads_per_worker == 2
    assert bool(plan.notes) == shared and all("paused" in n and "\n" not in n for n in plan.notes)
    assert not plan.two_phase and plan.quiet_timing == (expect_workers > 1)
    data = report.collect(plan, {t.id: [] for t in plan.trials}, "now", "running")
    assert data["executor"]["exact"] is True and data["executor"]["workers"] == expect_workers
    assert "exact: each trial on its recipe's threads" in report.render_markdown(data)
    assert "exact: each trial on its recipe&#x27;s threads" in report.render_html(data)


def test_no_exact_and_build_threads(prune_recipe, tmp_path, monkeypatch):
    """--no-exact is the old schedule; --build-threads N implies it unless N is the recipe's threads;
    a grid over `threads` gives each trial its own, concurrency by the largest."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    plan = _plan(prune_recipe, tmp_path / "a", workers=2, exact=False)
    assert not plan.exact and (plan.workers, plan.threads_per_worker) == (2, 1) and not plan.notes
    assert "not exact (--no-exact" in report.render_markdown(report.collect(plan, {}, "now", "running"))
    plan = _plan(prune_recipe, tmp_path / "b", workers=2, build_threads=1)
    assert not plan.exact and (plan.workers, plan.threads_per_worker) == (2, 1)
    plan = _plan(prune_recipe, tmp_path / "c", workers=2, build_threads=2)
    assert plan.exact and (plan.workers, plan.threads_per_worker) == (2, 2) and plan.quiet_timing
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    plan = _plan(prune_recipe, tmp_path / "d", grids=("threads=1,2",))
    assert plan.exact and (plan.workers, plan.threads_per_worker) == (2, 2)
    assert sorted(plan.threads_of(r) for r in plan.recipes.values()) == [1, 2]


@pytest.mark.parametrize("before, args", [(False, []), (True, ["--no-exact"]), (None, [])])
def test_resuming_a_sweep_of_the_other_mode_is_bad_input(prune_recipe, tmp_path, before, args):
    """The thread count is not in the resume hash: a directory's trials and cache are of one mode."""
    out = tmp_path / "sweep"
    out.mkdir()
    executor = {"name": "local"} if before is None else {"name": "local", "exact": before}
    (out / "sweep.json").write_text(json.dumps({"executor": executor}))
    res = CliRunner().invoke(cli, ["sweep", str(prune_recipe), "--out", str(out), *args], standalone_mode=False)
    assert isinstance(res.exception, BadInput) and res.exception.exit_code == 2
    assert "holds a sweep run with" in str(res.exception) and sorted(os.listdir(out)) == ["sweep.json"]


def test_exact_trials_run_whole_and_spread_over_their_branch_points(prune_recipe, tmp_path, monkeypatch):
    """Exact and local: no prefix or build tasks; every trial one phase on the recipe's threads through
    the stage cache (parallel trials sharing a stage wait for its claim), ordered so that trials
    side by side share as little as possible. --no-exact keeps the prefix and build phases."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    grids = ("stages.prune.amount=0.4,0.5", "stages.quantize.calibration=minmax,percentile")
    plan = _plan(prune_recipe, tmp_path / "a", grids=grids, workers=2)
    build, final, _ = _tasks(plan, plan.trials)
    assert not build and not _prefix_waves(plan, build)
    assert [(t.phase, t.threads) for t in final] == [("full", 2)] * 4 and all(t.stage_cache for t in final)
    order = [t.trial_id for t in _spread(final, {t.trial_id: stage_chain(plan.recipes[t.trial_id]) for t in final}, 2)]
    amounts = [plan.recipes[i].stages[0].config.amount for i in order]
    assert amounts == [0.4, 0.5, 0.4, 0.5]  # neighbours never share the prune
    plan = _plan(prune_recipe, tmp_path / "b", grids=QUANT_GRID, workers=2, exact=False)
    build, final, _ = _tasks(plan, plan.trials)
    waves = _prefix_waves(plan, build)
    assert [[t.phase for t in w] for w in waves] == [["prefix"]] and [t.phase for t in final] == ["time"] * 2
