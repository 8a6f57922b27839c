"""Plug-ins: one file (tests/fmap_plugin_example.py) registers a backend, a prune criterion, a
model source and a report format, and the CLI runs them like built-ins (docs/architecture.md)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pipeline import plugins
from pipeline.backends import backend_names
from pipeline.backends.base import BACKENDS
from pipeline.cli import main
from pipeline.plugins import PLUGIN_ENV
from pipeline.pruning.importance import CRITERIA
from pipeline.report import REPORT_FORMATS
from pipeline.sources.registry import SOURCES

PLUGIN = Path(__file__).with_name("fmap_plugin_example.py")


@pytest.fixture(autouse=True)
def forget_plugins():
    """Each test loads the plug-in afresh; later test modules see only the built-ins."""
    with plugins.scoped(), BACKENDS.scoped(), CRITERIA.scoped(), SOURCES.scoped(), REPORT_FORMATS.scoped():
        yield


def _cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code)


def _recipe(tmp_path: Path, plugins: str) -> Path:
    text = textwrap.dedent(f"""\
        name: plugged
        plugins: [{plugins}]
        model:
          source: plugnet:8
          input_shape: [1, 3, 16, 16]
        data:
          calibration: {{source: random, samples: 16}}
          eval: {{source: random, samples: 16}}
        stages:
          - prune: {{criterion: random, target: ratio, amount: 0.25, bn_reestimate: false}}
          - export: {{}}
          - verify:
              backends: [torch, onnxruntime, ort_basic]
              latency: {{batch_sizes: [1], warmup: 1, iterations: 5}}
              gates: {{min_agreement: 0.99}}
        """)
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_plugin_from_the_recipe_runs_through_fmap_run(tmp_path):
    (tmp_path / PLUGIN.name).write_text(PLUGIN.read_text())  # `plugins:` resolves beside the recipe
    out = tmp_path / "run"
    assert _cli(["run", str(_recipe(tmp_path, PLUGIN.name)), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    prune, _, verify = manifest["stages"]
    assert prune["metrics"]["criterion"] == "random" and prune["status"] == "ok"
    rows = {(r["artifact"], r["backend"]): r for r in verify["metrics"]["results"]}
    basic = rows[("onnx_fp32", "ort_basic")]
    assert basic["session"]["backend"] == "ort_basic" and basic["accuracy"]["agreement"] == 1.0
    assert rows[("onnx_fp32", "onnxruntime")]["accuracy"]["agreement"] == 1.0
    csv_lines = (out / "report.csv").read_text().splitlines()  # the plug-in format, written by the run
    assert csv_lines[0] == "artifact,backend,agreement" and "onnx_fp32,ort_basic,1.0" in csv_lines
    assert "ort_basic" in backend_names()


def test_report_format_from_env_and_option(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _cli(["run", str(_recipe(tmp_path, str(PLUGIN))), "--out", str(out)]) == 0
    (out / "report.csv").unlink()
    monkeypatch.setenv(PLUGIN_ENV, str(PLUGIN))
    assert _cli(["report", str(out), "--format", "csv"]) == 0
    assert (out / "report.csv").read_text().startswith("artifact,backend,agreement\n")
    monkeypatch.delenv(PLUGIN_ENV)
    (out / "report.csv").unlink()
    assert _cli(["--plugin", str(PLUGIN), "report", str(out), "--format", "csv"]) == 0
    assert (out / "report.csv").is_file()


def test_bad_plugins_are_bad_input(tmp_path, capsys):
    assert _cli(["--plugin", str(tmp_path / "missing.py"), "report", str(tmp_path)]) == 2
    assert "plug-in file" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('half-written plug-in')\n")
    assert _cli(["--plugin", str(broken), "report", str(tmp_path)]) == 2
    assert "half-written plug-in" in capsys.readouterr().err
    assert _cli(["report", str(tmp_path), "--format", "nope"]) == 2


def test_plugins_are_forgotten_between_tests():
    assert "ort_basic" not in backend_names() and "csv" not in REPORT_FORMATS


def test_unregistered_names_are_refused_by_validate(tmp_path, capsys):
    recipe = _recipe(tmp_path, str(PLUGIN)).read_text().replace("ort_basic]", "ort_fancy]")
    (tmp_path / "bad.yaml").write_text(recipe)
    assert _cli(["validate", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown backend 'ort_fancy'" in capsys.readouterr().err
