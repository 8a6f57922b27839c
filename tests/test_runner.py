"""Runner: manifest and lock file, atomic artifacts, resume skipping unchanged stages, Ctrl-C -> 130."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest

from pipeline import stages as stage_registry
from pipeline.cli import main
from pipeline.recipe import load_recipe
from pipeline.runner import run_recipe
from pipeline.stages.base import Artifact, GateResult, Stage, StageConfig, StageResult
from conftest import tiny_factory  # noqa: F401  (the model source python:<this module>:tiny_factory)

CALLS: list[str] = []



class CountConfig(StageConfig):
    value: int = 1
    fail_gate: bool = False
    interrupt: bool = False


class CountStage(Stage):
    """Writes one artifact and records each call, so tests can see what ran."""

    name: ClassVar[str] = "count"
    Config = CountConfig

    def run(self, ctx, cfg):
        CALLS.append(f"run:{cfg.value}")
        if cfg.interrupt:
            raise KeyboardInterrupt
        path = ctx.path(f"count-{cfg.value}.txt")
        path.write_text(str(cfg.value))
        gates = [GateResult("value_below", 5, cfg.value, not cfg.fail_gate)]
        return StageResult(metrics={"value": cfg.value}, artifacts={f"count{cfg.value}": Artifact(path, "other")},
                           gates=gates)

    def restore(self, ctx, cfg, result):
        CALLS.append(f"restore:{cfg.value}")


@pytest.fixture(autouse=True)
def register_count_stage(monkeypatch):
    monkeypatch.setitem(stage_registry.STAGES, "count", f"{__name__}:CountStage")
    CALLS.clear()


def recipe_file(tmp_path: Path, values=(1, 2), extra: str = "") -> Path:
    stages = "\n".join(f"  - count: {{value: {v}{extra}}}" for v in values)
    text = textwrap.dedent(f"""\
        name: unit
        output_dir: runs
        model:
          source: python:{__name__}:tiny_factory
          input_shape: [1, 3, 8, 8]
        data:
          eval: {{source: random, samples: 4}}
        stages:
        """) + stages + "\n"
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_run_writes_lock_manifest_and_hashes(tmp_path):
    outcome = run_recipe(load_recipe(recipe_file(tmp_path)))
    assert outcome.exit_code == 0
    run_dir = tmp_path / "runs" / "unit"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "ok" and [s["status"] for s in manifest["stages"]] == ["ok", "ok"]
    art = manifest["stages"][0]["artifacts"]["count1"]
    assert art["path"] == "count-1.txt" and len(art["sha256"]) == 64
    assert "torch" in manifest["environment"]["libraries"]
    lock = (run_dir / "recipe.lock.yaml").read_text()
    assert "threads: 2" in lock and "value: 1" in lock  # defaults resolved
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_resume_skips_unchanged_and_reruns_changed(tmp_path):
    path = recipe_file(tmp_path)
    run_recipe(load_recipe(path))
    CALLS.clear()
    outcome = run_recipe(load_recipe(path), resume=True)
    assert CALLS == ["restore:1", "restore:2"]
    assert all(s["resumed"] for s in outcome.manifest["stages"])
    CALLS.clear()
    run_recipe(load_recipe(path, ["stages[1].value=3"]), resume=True)
    assert CALLS == ["restore:1", "run:3"]  # first stage unchanged, second changed


def test_resume_reruns_when_artifact_missing_or_changed(tmp_path):
    path = recipe_file(tmp_path)
    run_recipe(load_recipe(path))
    (tmp_path / "runs" / "unit" / "count-1.txt").write_text("tampered")
    CALLS.clear()
    run_recipe(load_recipe(path), resume=True)
    assert CALLS == ["run:1", "run:2"]  # a changed artifact invalidates it and everything after


def test_without_resume_everything_runs(tmp_path):
    path = recipe_file(tmp_path)
    run_recipe(load_recipe(path))
    CALLS.clear()
    run_recipe(load_recipe(path))
    assert CALLS == ["run:1", "run:2"]


def test_failed_gate_exits_1(tmp_path):
    path = recipe_file(tmp_path, values=(1,), extra=", fail_gate: true")
    with pytest.raises(SystemExit) as info:
        main(["run", str(path)])
    assert info.value.code == 1
    manifest = json.loads((tmp_path / "runs" / "unit" / "manifest.json").read_text())
    assert manifest["status"] == "gate_failed" and manifest["exit_code"] == 1


def test_interrupt_exits_130_and_leaves_resumable_dir(tmp_path):
    path = recipe_file(tmp_path, values=(1, 2))
    with pytest.raises(SystemExit) as info:
        main(["run", str(path), "--set", "stages[1].interrupt=true"])
    assert info.value.code == 130
    manifest = json.loads((tmp_path / "runs" / "unit" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert [s["status"] for s in manifest["stages"]] == ["ok", "interrupted"]
    CALLS.clear()
    with pytest.raises(SystemExit) as again:
        main(["run", str(path), "--resume"])
    assert again.value.code == 0 and CALLS == ["restore:1", "run:2"]


def test_model_that_fails_on_input_shape_is_bad_input(tmp_path):
    path = recipe_file(tmp_path)
    path.write_text(path.read_text().replace("[1, 3, 8, 8]", "[1, 5, 8, 8]"))
    with pytest.raises(SystemExit) as info:
        main(["run", str(path)])
    assert info.value.code == 2


def test_json_output(tmp_path, capsys):
    path = recipe_file(tmp_path, values=(1,))
    with pytest.raises(SystemExit):
        main(["run", str(path), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["exit_code"] == 0 and result["stages"][0]["id"] == "count"


class SleepConfig(StageConfig):
    seconds: float = 30.0


class SleepStage(Stage):
    name: ClassVar[str] = "sleep"
    Config = SleepConfig

    def run(self, ctx, cfg):
        import time

        ctx.path("started").write_text("1")
        time.sleep(cfg.seconds)
        return StageResult()


def test_real_sigint_exits_130(tmp_path):
    """A real Ctrl-C (SIGINT to the process) mid-stage: exit 130, manifest says interrupted."""
    import signal
    import subprocess
    import sys
    import time

    path = recipe_file(tmp_path, values=(1,))
    path.write_text(path.read_text().replace("  - count: {value: 1}", "  - count: {value: 1}\n  - sleep: {}"))
    script = (
        # a terminal's Ctrl-C: a shell's background job (`cmd &`) would hand the child SIGINT ignored
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); sys.path.insert(0, %r)\n"
        "from pipeline import stages\n"
        "stages.STAGES['count'] = 'test_runner:CountStage'\n"
        "stages.STAGES['sleep'] = 'test_runner:SleepStage'\n"
        "from pipeline.cli import main\n"
        "main(['run', %r])\n" % (str(Path(__file__).parent), str(path))
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    marker = tmp_path / "runs" / "unit" / "started"
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), proc.stderr.read().decode() if proc.poll() is not None else "stage never started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err
    manifest = json.loads((tmp_path / "runs" / "unit" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert [s["status"] for s in manifest["stages"]] == ["ok", "interrupted"]


def test_missing_command_module_is_a_clear_error_not_a_crash(monkeypatch, capsys):
    from pipeline import cli as cli_module

    monkeypatch.setitem(cli_module.LAZY_COMMANDS, "ghost", ("pipeline.no_such_module:cmd", "A missing tool."))
    with pytest.raises(SystemExit) as info:
        main(["ghost"])
    assert info.value.code == 3
    assert "'fmap ghost' is unavailable" in capsys.readouterr().err


def test_a_stage_that_does_not_deliver_its_declared_artifact_fails_the_run(tmp_path, monkeypatch):
    """produces() is a contract the runner enforces: exit 3, the stage marked failed, nothing recorded."""
    from pipeline.recipe import parse_recipe
    from pipeline.runner import run_recipe
    from pipeline.stages.export import ExportStage

    recipe = parse_recipe("name: t\nmodel: {source: builtin:digits_cnn, input_shape: [1, 1, 32, 32]}\n"
                          "data: {calibration: {source: builtin, split: calibration, samples: 8}}\n"
                          "stages:\n  - export: {}\n", "r.yaml")
    monkeypatch.setattr(ExportStage, "produces", lambda self, cfg: ("onnx_fp32", "onnx_gold"))
    outcome = run_recipe(recipe, out=tmp_path / "run")
    assert outcome.exit_code == 3 and "declares the artifact 'onnx_gold'" in (outcome.error or "")
