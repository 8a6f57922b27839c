"""fmap sweep: grid parsing, objectives, the Pareto front, bad input before any trial, and one real
sweep (tiny recipe, 2 workers, a failing trial, latency timed with the other trial paused, resume)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import BadInput
from pipeline.sweep import grid, objectives
from pipeline.sweep.pareto import dominates, front

ROOT = Path(__file__).resolve().parents[2]

# -- grid ------------------------------------------------------------------------------------


def test_grid_splits_on_top_level_commas_only():
    g = grid.parse_grid("stages.verify.latency.batch_sizes=[1],[1, 8]")
    assert g.values == ("[1]", "[1, 8]")
    assert grid.parse_grid("stages.prune.amount=0.3,0.5,0.3").values == ("0.3", "0.5")


@pytest.mark.parametrize("item", ["stages.prune.amount=", "stages.prune.amount=0.3,", "=1,2", "noequals"])
def test_grid_rejects_empty_lists_and_keys(item):
    with pytest.raises(BadInput, match="--grid"):
        grid.parse_grid(item)


def test_trials_are_the_product_with_stable_ids():
    grids = grid.parse_grids(["a.x=1,2", "b.y=p,q,r"])
    ts = grid.trials(grids, ("seed=1",))
    assert len(ts) == 6
    assert ts[0].overrides == ("seed=1", "a.x=1", "b.y=p") and ts[0].params == {"a.x": 1, "b.y": "p"}
    assert len({t.id for t in ts}) == 6
    # the same point keeps its directory when another value is added to the grid (resume)
    more = grid.trials(grid.parse_grids(["a.x=1,2,3", "b.y=p,q,r"]), ("seed=1",))
    assert {t.id for t in ts} <= {t.id for t in more}
    assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", t.id) for t in more)


# -- objectives, constraints, front ------------------------------------------------------------


def test_objectives_and_constraints_parse_and_check_names():
    assert [str(o) for o in objectives.parse_objectives(("agreement", "latency_ms:min"))] == [
        "agreement:max", "latency_ms:min"]
    c = objectives.parse_constraint(" agreement >= 0.99 ")
    assert (c.name, c.op, c.bound) == ("agreement", ">=", 0.99)
    assert c.holds(0.995) and not c.holds(0.98) and not c.holds(None)
    with pytest.raises(BadInput, match="did you mean 'latency_ms'"):
        objectives.parse_objective("latency_mss:min")
    with pytest.raises(BadInput, match="direction"):
        objectives.parse_objective("agreement:up")
    for bad in ("agreement=>0.9", "agreement>=", ">=0.9", "agreement>=0.9x"):
        with pytest.raises(BadInput, match="--constraint"):
            objectives.parse_constraint(bad)
    with pytest.raises(BadInput, match="unknown metric"):
        objectives.parse_constraint("acc>=0.9")


def test_values_come_from_the_deployable_row():
    report = {"artifacts": [
        {"artifact": "original", "backend": "torch", "deployable": False, "agreement": 1.0, "p50_ms": 3.0,
         "size_bytes": 3_000_000},
        {"artifact": "onnx_int8", "backend": "onnxruntime", "deployable": True, "agreement": 0.99, "p50_ms": 1.0,
         "size_bytes": 1_000_000},
        {"artifact": "onnx_int8", "backend": "openvino", "deployable": True, "agreement": 0.98, "p50_ms": None,
         "size_bytes": 1_000_000}]}
    row = objectives.deployable_row(report)
    assert objectives.values(row, ["agreement", "latency_ms", "size_mb"]) == {
        "agreement": 0.99, "latency_ms": 1.0, "size_mb": 1.0}
    ov = objectives.deployable_row(report, "openvino")
    assert objectives.values(ov, ["latency_ms"]) == {"latency_ms": None}  # unmeasured stays None
    assert objectives.deployable_row(report, "tensorrt") is None


def test_pareto_front():
    d = ["max", "min"]
    assert dominates([0.99, 1.0], [0.98, 2.0], d) and not dominates([0.99, 1.0], [0.99, 1.0], d)
    pts = {"a": [0.99, 3.0], "b": [0.97, 1.0], "c": [0.96, 2.0], "d": [0.99, 3.5], "e": [1.0, 5.0]}
    assert front(pts, d) == ["a", "b", "e"]


# -- bad input: one line, exit 2, no trial started -------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--grid", "stages.quantize.nope=1,2"], "stages[1].quantize.nope: unknown key"),
    (["--grid", "stages.prune.amount=0.3,0.5"], "no stage 'prune'"),
    (["--grid", "stages.quantize.mode=static,int4"], "expected 'static' | 'dynamic' | 'fp16', got 'int4'"),
    (["--grid", "stages.quantize.mode="], "empty value list"),
    (["--objective", "latency:min"], "unknown metric 'latency'"),
    (["--constraint", "agreement>>0.99"], "expected NAME OP NUMBER"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--exact", "--build-threads", "2"], "--exact runs every trial on its recipe's threads, but --build-threads is 2"),
    (["--grid", "threads=1,2", "--exact", "--build-threads", "2"], "and trial threads-1_"),
    (["--build-threads", "0"], "--build-threads must be at least 1"),
])
def test_bad_input_exits_2_before_any_trial(tiny_recipe, tmp_path, args, message):
    out = tmp_path / "sweep"
    res = CliRunner().invoke(cli, ["sweep", str(tiny_recipe), "--out", str(out), *args], standalone_mode=False)
    assert isinstance(res.exception, BadInput) and res.exception.exit_code == 2
    assert message in str(res.exception) and "\n" not in str(res.exception)
    assert not out.exists()


def test_ray_missing_or_unreachable_is_bad_input(tiny_recipe, tmp_path):
    if importlib.util.find_spec("ray") is not None:
        with socket.socket() as sock:  # a port nobody listens on once closed
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        args, message = ["--address", f"ray://127.0.0.1:{port}"], "is unreachable"
    else:
        args, message = [], "Ray is not installed"
    res = CliRunner().invoke(cli, ["sweep", str(tiny_recipe), "--out", str(tmp_path / "s"), "--executor", "ray", *args],
                             standalone_mode=False)
    assert isinstance(res.exception, BadInput) and message in str(res.exception)
    assert not (tmp_path / "s").exists()


# -- one real sweep -----------------------------------------------------------------------------------


def _sweep(recipe: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "sweep", str(recipe), "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def _trials(out: Path) -> list[dict]:
    return json.loads((out / "sweep.json").read_text())["trials"]


def test_sweep_two_workers_failing_trial_quiet_timing_and_resume(tiny_recipe, tmp_path):
    """The default-suite sweep: 2 trials on 2 workers, one failing at run time (2 fmap processes)."""
    out = tmp_path / "sweep"
    grids = ["--grid", "model.input_shape=[1,1,32,32],[1,3,32,32]"]
    res = _sweep(tiny_recipe, out, *grids, "--workers", "2", "--constraint", "agreement>=0.5")
    assert res.returncode == 0, res.stderr
    assert "latency measured with the others paused" in res.stderr
    ok, bad = _trials(out)  # leaderboard order: the front first, failures last
    assert ok["params"] == {"model.input_shape": [1, 1, 32, 32]} and ok["status"] == "ok"
    assert ok["pareto"] and ok["feasible"]
    # a failing trial is recorded with its one-line error and did not stop the other
    assert bad["status"] == "failed" and "fails on an input of shape [1, 3, 32, 32]" in bad["error"]
    assert not bad["feasible"] and not bad["pareto"] and [p["phase"] for p in bad["phases"]] == ["full"]
    run_dir = out / ok["run_dir"]
    report = json.loads((run_dir / "report.json").read_text())
    row = next(r for r in report["artifacts"] if r["deployable"])
    assert ok["objectives"] == {"agreement": row["agreement"], "latency_ms": row["p50_ms"],
                                "size_mb": row["size_bytes"] * 1e-6}
    # one process per trial; its verify asked the sweep for a quiet machine (the failing trial usually has
    # failed by then, but a slow start can still have it running: then it was paused)
    assert [p["phase"] for p in ok["phases"]] == ["full"]
    verify = next(s for s in report["stages"] if s["id"] == "verify")
    assert verify["metrics"]["machine"]["conditions"]["1"]["paused_trials"] in (0, 1)
    html = (out / "sweep.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html
    assert re.search(rf'<area shape="circle" coords="\d+,\d+,8" href="trials/{ok["id"]}/report.html"', html)
    md = (out / "sweep.md").read_text()
    assert f"[report](trials/{ok['id']}/report.md)" in md and "| failed: model 'builtin:digits_cnn' fails" in md

    # resume: nothing re-run; a new constraint is judged on the finished runs; nobody meets it: exit 1
    before = (run_dir / "manifest.json").stat().st_mtime_ns
    res = CliRunner().invoke(cli, ["sweep", str(tiny_recipe), "--out", str(out), *grids, "--workers", "2",
                                   "--constraint", "size_mb<0.001"], standalone_mode=False)
    assert res.exception is None and res.return_value == 1
    assert "1 of 2 trials already finished" in res.output and "1 trial(s) failed in an earlier sweep" in res.output
    assert (run_dir / "manifest.json").stat().st_mtime_ns == before
    again = _trials(out)
    assert [t["status"] for t in again] == ["ok", "failed"] and again[0]["violations"] == ["size_mb<0.001"]
    assert not any(t["pareto"] for t in again)


@pytest.mark.slow
def test_sweep_product_grid_resumes_an_interrupted_trial(tiny_recipe, tmp_path):
    """4 trials (2 fail), then a sweep killed mid-trial continues from that trial's finished stages."""
    out = tmp_path / "sweep"
    grids = ["--grid", "model.input_shape=[1,1,32,32],[1,3,32,32]", "--grid", "stages.quantize.mode=static,dynamic"]
    res = _sweep(tiny_recipe, out, *grids, "--workers", "2", "--constraint", "agreement>=0.5")
    assert res.returncode == 0, res.stderr
    trials = _trials(out)
    ok = [t for t in trials if t["status"] == "ok"]
    assert len(ok) == 2 and all(t["params"]["model.input_shape"] == [1, 1, 32, 32] for t in ok)
    assert data_front(out) and set(data_front(out)) <= {t["id"] for t in ok}
    keep, redo = ok
    manifest = out / redo["run_dir"] / "manifest.json"
    m = json.loads(manifest.read_text())
    m["status"], m["finished"] = "interrupted", None  # what a killed sweep leaves behind
    manifest.write_text(json.dumps(m))
    before = (out / keep["run_dir"] / "manifest.json").stat().st_mtime_ns
    res = _sweep(tiny_recipe, out, *grids, "--workers", "1", "--constraint", "agreement>=0.5")
    assert res.returncode == 0, res.stderr
    assert "1 of 4 trials already finished" in res.stderr
    assert "2 trial(s) failed in an earlier sweep and are not retried" in res.stderr
    assert (out / keep["run_dir"] / "manifest.json").stat().st_mtime_ns == before
    again = {t["id"]: t for t in _trials(out)}
    assert again[redo["id"]]["status"] == "ok"
    assert sum(t["status"] == "failed" for t in again.values()) == 2
    stages = json.loads(manifest.read_text())["stages"]
    assert all(s["resumed"] for s in stages if s["id"] != "verify")


def data_front(out: Path) -> list[str]:
    return json.loads((out / "sweep.json").read_text())["pareto_front"]


@pytest.mark.slow
def test_ray_executor_on_a_local_cluster(tiny_recipe, tmp_path):
    """4 trials, each build phase a Ray task on a local Ray (127.0.0.1) started and stopped by fmap."""
    pytest.importorskip("ray")
    out = tmp_path / "sweep"
    res = _sweep(tiny_recipe, out, "--executor", "ray", "--workers", "2", "--grid", "stages.quantize.mode=static,dynamic",
                 "--grid", "stages.quantize.per_channel=true,false")
    assert res.returncode == 0, res.stderr
    data = json.loads((out / "sweep.json").read_text())
    assert data["executor"]["name"] == "ray" and data["summary"]["finished"] == 4
    for t in data["trials"]:
        assert t["status"] == "ok" and [p["phase"] for p in t["phases"]] in (["build", "time"],
                                                                             ["prefix", "build", "time"])
        assert (out / t["run_dir"] / "report.html").is_file()
    assert data["pareto_front"]


# -- --search optuna ------------------------------------------------------------------------------


def test_param_parsing_and_bad_params():
    from pipeline.sweep import search

    p = search.parse_param("stages.prune.amount=float:0.2:0.8")
    assert (p.kind, p.low, p.high, p.log) == ("float", 0.2, 0.8, False) and p.texts() == ["0.2", "0.8"]
    assert search.parse_param("data.calibration.samples=int:16:64:log").log
    assert search.parse_param("stages.quantize.mode=choice:static,dynamic,static").choices == ("static", "dynamic")
    for bad, msg in [("a=float:0.8:0.2", "LO < HI"), ("a=int:1.5:3", "not an integer"), ("a=choice:", "empty choice"),
                     ("a=uniform:0:1", "expected KEY=float"), ("a=float:0:1:log", "LO > 0"), ("a=float:0:1:x", "LO:HI")]:
        with pytest.raises(BadInput, match=msg):
            search.parse_param(bad)
    with pytest.raises(BadInput, match="given twice"):
        search.parse_params(["a=int:1:2", "a=int:1:3"])
    c = objectives.parse_constraint("agreement>=0.9")
    assert search.violation(c, 0.95) == 0.0 and search.violation(c, 0.8) == pytest.approx(0.1)


@pytest.mark.parametrize("args, message", [
    (["--search", "optuna", "--trials", "2"], "needs at least one --param"),
    (["--search", "optuna", "--param", "stages.quantize.mode=choice:static"], "needs --trials N"),
    (["--search", "optuna", "--trials", "2", "--param", "stages.quantize.nope=int:1:2"], "unknown key"),
    (["--search", "optuna", "--trials", "2", "--param", "stages.quantize.mode=choice:static,int4"], "int4"),
    (["--search", "optuna", "--trials", "2", "--param", "stages.quantize.mode=choice:static",
      "--grid", "seed=1,2"], "exclude each other"),
    (["--param", "stages.quantize.mode=choice:static"], "need --search optuna"),
])
def test_search_bad_input_exits_2_before_any_trial(tiny_recipe, tmp_path, args, message):
    out = tmp_path / "sweep"
    res = CliRunner().invoke(cli, ["sweep", str(tiny_recipe), "--out", str(out), *args], standalone_mode=False)
    assert isinstance(res.exception, BadInput) and message in str(res.exception), res.output
    assert not out.exists()


@pytest.mark.slow  # 33 s: keeps the default suite under 10 minutes on the slower CI CPUs
def test_optuna_search_is_seeded_and_resumes(tiny_recipe, tmp_path):
    """3 asked trials on one worker; the same seed asks the same points, and a rerun re-runs nothing."""
    pytest.importorskip("optuna")
    args = ["--search", "optuna", "--trials", "3", "--workers", "1", "--seed", "7",
            "--param", "data.calibration.samples=int:8:32", "--param", "stages.quantize.per_channel=choice:true,false",
            "--objective", "agreement:max", "--objective", "size_mb:min", "--constraint", "agreement>=0.5"]
    out = tmp_path / "sweep"
    res = _sweep(tiny_recipe, out, *args)
    assert res.returncode == 0, res.stderr
    data = json.loads((out / "sweep.json").read_text())
    assert data["search"]["strategy"] == "optuna" and data["search"]["trials"] == 3
    ids = sorted(t["id"] for t in data["trials"])
    assert 1 <= len(ids) <= 3 and all(t["status"] == "ok" for t in data["trials"])
    for t in data["trials"]:  # each trial is an ordinary run with the sampled values
        lock = (out / t["run_dir"] / "recipe.lock.yaml").read_text()
        assert f"samples: {t['params']['data.calibration.samples']}" in lock
        assert 8 <= t["params"]["data.calibration.samples"] <= 32
    before = {i: (out / "trials" / i / "manifest.json").stat().st_mtime_ns for i in ids}
    res = CliRunner().invoke(cli, ["sweep", str(tiny_recipe), "--out", str(out), *args], standalone_mode=False)
    assert res.exception is None and res.return_value == 0
    assert sorted(t["id"] for t in _trials(out)) == ids  # same seed, same results: the same points
    assert {i: (out / "trials" / i / "manifest.json").stat().st_mtime_ns for i in ids} == before
    # a longer search continues this one: the first three asks are the same, one more trial runs
    more = [a if a != "3" else "4" for a in args]
    res = CliRunner().invoke(cli, ["sweep", str(tiny_recipe), "--out", str(out), *more], standalone_mode=False)
    assert res.exception is None and res.return_value == 0
    assert set(ids) <= {t["id"] for t in _trials(out)} and len(_trials(out)) <= 4
    assert {i: (out / "trials" / i / "manifest.json").stat().st_mtime_ns for i in ids} == before


@pytest.mark.slow
def test_sweep_shares_the_export_of_trials_that_differ_in_quantize(tiny_recipe, tmp_path):
    """3 trials on 2 workers: export runs once (the first trial to claim it), the others copy it from OUT/cache."""
    out = tmp_path / "sweep"
    res = _sweep(tiny_recipe, out, "--workers", "2", "--grid", "stages.quantize.calibration=minmax,percentile,entropy")
    assert res.returncode == 0, res.stderr
    trials = _trials(out)
    exports = {t["id"]: json.loads((out / t["run_dir"] / "manifest.json").read_text())["stages"][0] for t in trials}
    leaders = [t for t in trials if exports[t["id"]]["reused"] is None]
    assert len(leaders) == 1 and all(exports[t["id"]]["id"] == "export" for t in trials)
    leader = out / leaders[0]["run_dir"]
    for t in trials:
        export = exports[t["id"]]
        if export["reused"]:
            assert export["reused"]["run_dir"] == str(leader)
            assert (out / t["run_dir"] / "model_fp32.onnx").read_bytes() == (leader / "model_fp32.onnx").read_bytes()
