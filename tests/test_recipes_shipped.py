"""Every recipe shipped in recipes/ validates, and the fast ones run end to end (shrunk via --set).

A recipe that drifts from the schema (a renamed stage key, a removed option) fails here, not in a
user's first `fmap run`. Runs use small inputs through `--set` overrides, exactly as a user would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
OWN = ["resnet18-edge.yaml", "mobilenet_v2-int8.yaml", "profile-only.yaml", "ci-gate.yaml"]


def _run(tmp_path: Path, recipe: str, *overrides: str) -> dict:
    args = ["run", str(ROOT / "recipes" / recipe), "--out", str(tmp_path / "run"), "--json"]
    for item in overrides:
        args += ["--set", item]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert "{" in res.stdout, res.output[-2000:]
    return json.loads(res.stdout[res.stdout.index("{"):])  # exit_code: what `fmap run` would exit with


def test_the_real_world_recipes_ship() -> None:
    names = {p.name for p in RECIPES}
    assert set(OWN) <= names, f"missing: {set(OWN) - names}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe: Path) -> None:
    res = CliRunner().invoke(cli, ["validate", str(recipe)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "ok" in res.output


@pytest.mark.parametrize("recipe", OWN)
def test_recipe_is_commented_for_copying(recipe: str) -> None:
    """Shipped recipes are documentation: a header that says what it does and how to run it."""
    text = (ROOT / "recipes" / recipe).read_text()
    header = text.split("\nname:")[0]
    assert header.count("#") >= 4 and "fmap run recipes/" in header
    assert yaml.safe_load(text)["name"] == recipe.removesuffix(".yaml")


def test_validate_cli_subprocess_rejects_a_broken_copy(tmp_path: Path) -> None:
    """The real executable: a typo in a copied recipe is exit 2 with the key named, not a traceback."""
    broken = tmp_path / "edge.yaml"
    broken.write_text((ROOT / "recipes" / "resnet18-edge.yaml").read_text().replace("round_to:", "round_too:"))
    proc = subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", "validate", str(broken)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "round_too" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_profile_only_runs_on_a_small_model(tmp_path: Path) -> None:
    out = _run(tmp_path, "profile-only.yaml", "model.source=torchvision:resnet18", "model.input_shape=[2,3,32,32]",
               "data.calibration.samples=4", "data.calibration.batch_size=4", "stages.profile.plots=false")
    assert out["exit_code"] == 0
    profile = json.loads((tmp_path / "run" / "profile" / "profile.json").read_text())
    assert profile["memory"]["liveness_peak_bytes"] > 0
    assert profile["totals"]["macs"] > 0


def test_mobilenet_int8_recipe_runs_small(tmp_path: Path) -> None:
    """The quantize-only recipe end to end at 64x64: an INT8 artifact, measured, gate evaluated."""
    out = _run(tmp_path, "mobilenet_v2-int8.yaml", "model.input_shape=[1,3,64,64]",
               "data.calibration.samples=8", "data.eval.samples=16",
               "stages.quantize.fallback.max_steps=0", "stages.quantize.debug_samples=2", "stages.quantize.backends=[]",
               "stages.verify.backends=[torch,onnxruntime]",
               "stages.verify.latency={batch_sizes: [1], warmup: 1, iterations: 5}")
    assert out["exit_code"] in (0, 1)  # random weights: the agreement gate may fail; it must be evaluated
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    stages = {s["id"]: s for s in manifest["stages"]}
    assert "onnx_int8" in stages["quantize"]["artifacts"]
    assert [g["name"] for g in stages["verify"]["gates"]] == ["min_agreement"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["ci-gate.yaml", "resnet18-edge.yaml"])
def test_recipe_runs_as_shipped(tmp_path: Path, recipe: str) -> None:
    out = _run(tmp_path, recipe)
    assert out["exit_code"] == 0, out
    assert (tmp_path / "run" / "report.md").is_file()
