"""Failures that lose nothing: run-directory lock, orphan temp files, final manifest status, stale
reports, disk full, --resume noticing changed data, and `fmap compare` refusing unfinished runs."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline import atomic
from pipeline import stages as stage_registry
from pipeline.cli import main
from pipeline.commands.report import compare
from pipeline.errors import BadInput
from pipeline.recipe import load_recipe
from pipeline.rundir import LOCK_FILE, RunDirLock, remove_orphans
from pipeline.runner import Runner, run_recipe
from pipeline.stages.base import Artifact, Stage, StageConfig, StageResult
from conftest import tiny_factory  # noqa: F401  (the model source python:<this module>:tiny_factory)

ROOT = Path(__file__).resolve().parents[1]
CALLS: list[str] = []



class StepConfig(StageConfig):
    value: int = 1
    crash: str | None = None  # "runtime", "enospc", "exit"


class StepStage(Stage):
    name: ClassVar[str] = "step"
    Config = StepConfig

    def run(self, ctx, cfg):
        CALLS.append(f"run:{cfg.value}")
        if cfg.crash == "runtime":
            raise RuntimeError("library exploded")
        if cfg.crash == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", str(ctx.run_dir / "model.onnx"))
        if cfg.crash == "exit":
            sys.exit(7)
        path = ctx.path(f"step-{cfg.value}.txt")
        atomic.write_text(path, str(cfg.value))
        return StageResult(metrics={"value": cfg.value}, artifacts={f"step{cfg.value}": Artifact(path, "other")})

    def restore(self, ctx, cfg, result):
        CALLS.append(f"restore:{cfg.value}")


@pytest.fixture(autouse=True)
def register_step_stage(monkeypatch):
    monkeypatch.setitem(stage_registry.STAGES, "step", f"{__name__}:StepStage")
    CALLS.clear()


def write_recipe(tmp_path: Path, stages: str = "  - step: {value: 1}\n  - step: {value: 2}\n",
                 data: str = "eval: {source: random, samples: 4}") -> Path:
    text = textwrap.dedent(f"""\
        name: unit
        output_dir: runs
        model:
          source: python:{__name__}:tiny_factory
          input_shape: [1, 3, 8, 8]
        data:
          {data}
        stages:
        """) + stages
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return int(info.value.code)


# -- lock --------------------------------------------------------------------------------------

def test_second_writer_is_refused_naming_the_pid(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.rundir import RunDirLock; "
         "RunDirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)", str(tmp_path / "out")],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        recipe = write_recipe(tmp_path)
        assert exit_code(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"run directory {tmp_path / 'out'} in use by pid {holder.pid}" in err
        assert not (tmp_path / "out" / "manifest.json").exists(), "the refused run wrote into the directory"
        holder.send_signal(signal.SIGKILL)  # a dead holder's lock is taken over
        holder.wait(10)
        assert exit_code(["run", str(recipe), "--out", str(tmp_path / "out")]) == 0
        assert not (tmp_path / "out" / LOCK_FILE).exists()
    finally:
        holder.kill()
        holder.wait(10)


def test_run_directory_that_is_a_file_is_bad_input(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    assert exit_code(["run", str(write_recipe(tmp_path)), "--out", str(tmp_path / "out")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_lock_is_exclusive_in_process_and_released(tmp_path):
    with RunDirLock(tmp_path):
        with pytest.raises(BadInput, match=f"in use by pid {os.getpid()}"):
            RunDirLock(tmp_path).acquire()
    with RunDirLock(tmp_path):
        pass


# -- orphans, stale reports, final status -------------------------------------------------------

def test_orphans_of_a_killed_run_are_removed_at_next_start(tmp_path):
    run_dir = tmp_path / "runs" / "unit"
    (run_dir / "visualize").mkdir(parents=True)
    orphan_file = run_dir / "visualize" / f".overlay.png{atomic.TEMP_MARK}4242.x1y2.png"
    orphan_file.write_bytes(b"")
    orphan_dir = run_dir / f".model_fp32.onnx{atomic.TEMP_MARK}4242.abcd.export"
    orphan_dir.mkdir()
    (orphan_dir / "raw.onnx").write_bytes(b"x")
    legacy = run_dir / ".model_fp32.export"
    legacy.mkdir()
    keep = run_dir / "visualize" / "overlay.png"
    keep.write_bytes(b"png")
    outcome = run_recipe(load_recipe(write_recipe(tmp_path)))
    assert outcome.exit_code == 0
    assert not orphan_file.exists() and not orphan_dir.exists() and not legacy.exists()
    assert keep.exists()
    assert not [p for p in run_dir.rglob("*") if atomic.TEMP_MARK in p.name]


def test_remove_orphans_lists_what_it_removed(tmp_path):
    (tmp_path / f".a.txt{atomic.TEMP_MARK}1.zz.txt").write_text("")
    assert [p.name for p in remove_orphans(tmp_path)] == [f".a.txt{atomic.TEMP_MARK}1.zz.txt"]


def test_sigkill_then_resume_leaves_no_temp_files_and_same_numbers(tmp_path):
    """A real SIGKILL while a stage holds an atomic temp file, then --resume."""
    helper = tmp_path / "slowstage.py"
    helper.write_text(textwrap.dedent("""\
        import time
        from pathlib import Path
        from pipeline import atomic
        from pipeline.stages.base import Artifact, Stage, StageConfig, StageResult

        class SlowConfig(StageConfig):
            value: int = 1

        class SlowStage(Stage):
            name = "slow"
            Config = SlowConfig

            def run(self, ctx, cfg):
                path = ctx.path(f"slow-{cfg.value}.txt")
                with atomic.atomic_path(path) as tmp:
                    tmp.write_text(str(cfg.value))
                    if cfg.value == 2:
                        Path(ctx.run_dir, "READY").write_text("")
                        time.sleep(120)
                return StageResult(metrics={"value": cfg.value}, artifacts={f"s{cfg.value}": Artifact(path, "other")})
        """))
    recipe = write_recipe(tmp_path, stages="  - slow: {value: 1}\n  - slow: {value: 2}\n")
    out = tmp_path / "out"
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from pipeline import stages; "
              "stages.STAGES['slow'] = 'slowstage:SlowStage'; sys.path.insert(0, sys.argv[2]); "
              "from pipeline.cli import main; main(sys.argv[3:])")
    argv = [sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parent), "run", str(recipe),
            "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not (out / "READY").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the slow stage never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proc.wait(10)
    assert manifest(out)["status"] == "running"
    assert [p for p in out.rglob("*") if atomic.TEMP_MARK in p.name], "the kill left no temp file to clean"
    (out / "READY").unlink()
    # resume in a fresh process, stage 2 no longer sleeps: value 2 -> the same file content
    helper.write_text(helper.read_text().replace("time.sleep(120)", "pass"))
    done = subprocess.run([*argv, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    m = manifest(out)
    assert m["status"] == "ok" and [s["resumed"] for s in m["stages"]] == [True, False]
    assert [s["metrics"]["value"] for s in m["stages"]] == [1, 2]
    assert (out / "slow-2.txt").read_text() == "2"
    assert not [p for p in out.rglob("*") if atomic.TEMP_MARK in p.name or p.name == LOCK_FILE]


def test_reports_of_an_earlier_run_go_when_a_new_run_starts(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path)
    run_dir = tmp_path / "runs" / "unit"
    assert run_recipe(load_recipe(recipe)).exit_code == 0
    assert (run_dir / "report.json").is_file() and (run_dir / "junit.xml").is_file()

    def broken(self):
        raise BadInput("data went away")

    monkeypatch.setattr(Runner, "build_context", broken)
    outcome = run_recipe(load_recipe(recipe))
    assert outcome.exit_code == 2 and manifest(run_dir)["status"] == "failed"
    assert not (run_dir / "report.json").exists() and not (run_dir / "junit.xml").exists()


@pytest.mark.parametrize("where", ["build", "stage"])
def test_internal_error_leaves_failed_manifest_and_exit_3(tmp_path, monkeypatch, capsys, where):
    if where == "build":
        def broken(self):
            raise ValueError("Overflow when unpacking long long")

        monkeypatch.setattr(Runner, "build_context", broken)
        recipe = write_recipe(tmp_path)
    else:
        recipe = write_recipe(tmp_path, stages="  - step: {value: 1, crash: runtime}\n")
    assert exit_code(["run", str(recipe)]) == 3
    m = manifest(tmp_path / "runs" / "unit")
    assert m["status"] == "failed" and m["exit_code"] == 3 and m["finished"]
    assert "error.log" in m["error"]
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error:")


def test_user_sys_exit_in_a_stage_is_a_named_failure(tmp_path, capsys):
    recipe = write_recipe(tmp_path, stages="  - step: {value: 1, crash: exit}\n")
    assert exit_code(["run", str(recipe)]) == 3
    assert "sys.exit(7)" in capsys.readouterr().err
    assert manifest(tmp_path / "runs" / "unit")["status"] == "failed"


def test_disk_full_in_a_stage_names_the_file(tmp_path, capsys):
    recipe = write_recipe(tmp_path, stages="  - step: {value: 1, crash: enospc}\n")
    assert exit_code(["run", str(recipe)]) == 3
    run_dir = tmp_path / "runs" / "unit"
    assert f"no space left on device while writing {run_dir / 'model.onnx'}" in capsys.readouterr().err
    assert manifest(run_dir)["status"] == "failed"


def test_disk_full_while_writing_reports_fails_the_run(tmp_path, monkeypatch, capsys):
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("report.html"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    recipe = write_recipe(tmp_path)
    assert exit_code(["run", str(recipe)]) == 3
    run_dir = tmp_path / "runs" / "unit"
    assert f"no space left on device while writing {run_dir / 'report.html'}" in capsys.readouterr().err
    m = manifest(run_dir)
    assert m["status"] == "failed" and m["exit_code"] == 3
    assert not (run_dir / "report.html").exists()
    assert not (run_dir / "report.json").exists(), "a report from before the failure would say the run was ok"
    assert not [p for p in run_dir.rglob("*") if atomic.TEMP_MARK in p.name], "half-written temp file left"


# -- resume hashes data ------------------------------------------------------------------------

def test_resume_notices_a_changed_data_file_at_the_same_path(tmp_path):
    npz = tmp_path / "data.npz"
    np.savez(npz, x=np.zeros((4, 3, 8, 8), np.float32), y=np.array([0, 1, 0, 1]))
    recipe = write_recipe(tmp_path, data=f"eval: {{source: numpy, path: {npz}}}")
    run_recipe(load_recipe(recipe))
    CALLS.clear()
    run_recipe(load_recipe(recipe), resume=True)
    assert CALLS == ["restore:1", "restore:2"]
    np.savez(npz, x=np.ones((4, 3, 8, 8), np.float32), y=np.array([0, 1, 0, 1]))
    CALLS.clear()
    run_recipe(load_recipe(recipe), resume=True)
    assert CALLS == ["run:1", "run:2"]


def test_resume_notices_a_changed_image_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / cls / "0.png")
    recipe = write_recipe(tmp_path, data=f"eval: {{source: imagefolder, path: {root}, transform: none, size: 8}}")
    run_recipe(load_recipe(recipe))
    CALLS.clear()
    run_recipe(load_recipe(recipe), resume=True)
    assert CALLS == ["restore:1", "restore:2"]
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "b" / "1.png")
    CALLS.clear()
    run_recipe(load_recipe(recipe), resume=True)
    assert CALLS == ["run:1", "run:2"]


# -- compare refuses unfinished runs -----------------------------------------------------------

@pytest.mark.parametrize("content, expect", [
    ({}, "empty manifest.json"),
    ({"stages": [], "status": "failed"}, "status 'failed'"),
    ({"stages": [{"id": "x", "kind": "profile", "status": "running"}], "status": "running"}, "status 'running'"),
    ({"stages": [{"id": "x", "kind": "profile", "status": "ok"}], "status": "interrupted"}, "status 'interrupted'"),
    ({"stages": []}, "no status"),
])
def test_compare_refuses_a_run_that_did_not_finish(tmp_path, content, expect):
    good = tmp_path / "runs" / "unit"
    run_recipe(load_recipe(write_recipe(tmp_path)))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps(content))
    for a, b in ((good, bad), (bad, good)):
        res = CliRunner().invoke(compare, [str(a), str(b)], standalone_mode=False)
        assert isinstance(res.exception, BadInput) and res.exception.exit_code == 2
        assert expect in str(res.exception) and str(bad) in str(res.exception)


PIPELINE_STAGES = """\
  - profile: {}
  - pause: {point: 1}
  - export: {}
  - pause: {point: 2}
  - quantize: {samples: 32}
  - pause: {point: 3}
  - verify: {backends: [torch, onnxruntime], latency: {batch_sizes: [1], warmup: 1, iterations: 5}}
  - pause: {point: 4}
"""

PAUSE_STAGE = """\
import os, time
from pathlib import Path
from pipeline.stages.base import Stage, StageConfig, StageResult

class PauseConfig(StageConfig):
    point: int = 0

class PauseStage(Stage):
    name = "pause"
    Config = PauseConfig

    def run(self, ctx, cfg):
        if os.environ.get("FMAP_TEST_KILL_AT") == str(cfg.point):
            Path(ctx.run_dir, "READY").write_text("")
            time.sleep(300)
        return StageResult(metrics={"point": cfg.point})
"""


def _final_numbers(out: Path) -> dict:
    """Everything but timings: artifact hashes, accuracy and agreement per artifact x backend."""
    m = manifest(out)
    hashes = {n: a.get("sha256") for s in m["stages"] for n, a in s["artifacts"].items()}
    verify = next(s for s in m["stages"] if s["kind"] == "verify")
    acc = {(r["artifact"], r["backend"]): {k: r["accuracy"].get(k) for k in ("top1", "agreement", "max_abs_err")}
           for r in verify["metrics"]["results"]}
    return {"status": m["status"], "hashes": hashes, "accuracy": acc}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_at_four_points_then_resume_gives_the_uninterrupted_numbers(tmp_path):
    (tmp_path / "pausestage.py").write_text(PAUSE_STAGE)
    npz = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, x=rng.standard_normal((32, 3, 8, 8)).astype(np.float32), y=rng.integers(0, 2, 32))
    recipe = write_recipe(tmp_path, stages=PIPELINE_STAGES, data=f"eval: {{source: numpy, path: {npz}}}")
    recipe.write_text(recipe.read_text().replace("data:\n", f"data:\n  calibration: {{source: numpy, path: {npz}}}\n"))
    script = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; from pipeline import stages; "
              "stages.STAGES['pause'] = 'pausestage:PauseStage'; from pipeline.cli import main; main(sys.argv[3:])")

    def fmap_run(out: Path, *extra: str, kill_at: int | None = None):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CI": "1"}
        env.pop("FMAP_TEST_KILL_AT", None)
        if kill_at is not None:
            env["FMAP_TEST_KILL_AT"] = str(kill_at)
        argv = [sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parent), "run", str(recipe),
                "--out", str(out), *extra]
        return subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    reference = tmp_path / "reference"
    ref = fmap_run(reference)
    assert ref.wait(600) == 0, ref.stderr.read().decode()[-2000:]
    expected = _final_numbers(reference)
    for point in (1, 2, 3, 4):
        out = tmp_path / f"killed{point}"
        proc = fmap_run(out, kill_at=point)
        deadline = time.monotonic() + 300
        while not (out / "READY").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert manifest(out)["status"] == "running"
        (out / "READY").unlink()
        resumed = fmap_run(out, "--resume")
        assert resumed.wait(600) == 0, resumed.stderr.read().decode()[-2000:]
        assert _final_numbers(out) == expected, f"kill at point {point}"
        assert not [p for p in out.rglob("*") if atomic.TEMP_MARK in p.name or p.name == LOCK_FILE]
        assert (out / "report.json").is_file() and (out / "junit.xml").is_file()


@pytest.fixture
def tiny_disk(tmp_path):
    """A real, small tmpfs (root with mount rights only, else skipped); unmounted afterwards."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        mnt = tmp_path / f"disk-{size}"
        mnt.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                               capture_output=True).returncode != 0:
            pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("size", ["40k", "200k"])
def test_real_disk_full_fails_the_run_with_a_final_manifest(tmp_path, tiny_disk, capsys, size):
    """40k: full while profiling; 200k: full while writing reports. Either way exit 3, the file
    named, manifest `failed` (written into the space the run held back), nothing half-written."""
    out = tiny_disk(size) / "out"
    recipe = write_recipe(tmp_path, stages="  - profile: {}\n  - export: {}\n")
    assert exit_code(["run", str(recipe), "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: no space left on device while writing" in err
    m = manifest(out)
    assert m["status"] == "failed" and m["exit_code"] == 3 and m["error"].startswith("no space left on device")
    assert not [p for p in out.rglob("*") if atomic.TEMP_MARK in p.name or p.name == LOCK_FILE]
    assert not [p for p in out.iterdir() if p.name in ("report.json", "report.md", "report.html", "junit.xml")]


def test_sigterm_ends_the_run_as_interrupted(tmp_path):
    """CI cancelling a job sends SIGTERM: the manifest must say interrupted, exit 130."""
    (tmp_path / "pausestage.py").write_text(PAUSE_STAGE)
    recipe = write_recipe(tmp_path, stages="  - pause: {point: 1}\n")
    out = tmp_path / "out"
    script = ("import sys; sys.path[:0] = [sys.argv[1]]; from pipeline import stages; "
              "stages.STAGES['pause'] = 'pausestage:PauseStage'; sys.path.insert(0, sys.argv[2]); "
              "from pipeline.cli import main; main(sys.argv[3:])")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FMAP_TEST_KILL_AT": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parent), "run",
                             str(recipe), "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not (out / "READY").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130
    finally:
        proc.kill()
        proc.wait(10)
    m = manifest(out)
    assert m["status"] == "interrupted" and m["exit_code"] == 130
    assert [s["status"] for s in m["stages"]] == ["interrupted"]
    assert not (out / LOCK_FILE).exists()
