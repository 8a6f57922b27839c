"""The three journeys of a new user, each at most three commands from nothing to a passing report:
(a) an own .py model + one labelled image folder, (b) an .onnx file + the same folder,
(c) a timm model by name. Plus the graph-only sources through the stages that need hooks.

Everything runs as a real `fmap` subprocess in the user's directory (no PYTHONPATH tricks beyond
the one that selects this checkout), on tiny models and 24-pixel images, so each takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.sources.test_model_sources import MODEL_PY

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--set", "stages.verify.latency.batch_sizes=[1]", "--set", "stages.verify.latency.iterations=5",
        "--set", "stages.verify.latency.warmup=1"]


def fmap(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CI="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=400, cwd=cwd, env=env)


def make_folder(root: Path, per_class: int = 12, size: int = 24) -> Path:
    """Three classes told apart by their dominant colour: a labelled folder a user would have."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, channel in (("red", 0), ("green", 1), ("blue", 2)):
        (root / "images" / label).mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
            a[..., channel] = rng.integers(150, 255, (size, size))
            Image.fromarray(a).save(root / "images" / label / f"{i}.png")
    return root / "images"


MAKE_FILES = """
import sys, warnings
import torch
sys.path.insert(0, ".")
from tinynet import tiny_net
model, x = tiny_net().eval(), torch.randn(1, 3, 24, 24)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(model, (x,), "tiny.onnx", dynamo=False, input_names=["img"], output_names=["logits"])
    torch.jit.save(torch.jit.trace(model, x), "tiny.ts")
torch.export.save(torch.export.export(model, (x,)), "tiny.pt2")
"""


@pytest.fixture(scope="module")
def project_template(tmp_path_factory) -> Path:
    """A user's directory: model code, its ONNX/TorchScript/torch.export files, one image folder.

    The model files are made in a child process, as the user would make them, so the exports'
    memory never lives in the test process (test_latency's RSS probe measures that process).
    Made once per module (the exports take seconds); each test gets its own copy."""
    root = tmp_path_factory.mktemp("project")
    make_folder(root)
    (root / "tinynet.py").write_text(MODEL_PY)
    made = subprocess.run([sys.executable, "-c", MAKE_FILES], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr
    return root


@pytest.fixture
def project(project_template, tmp_path) -> Path:
    """This test's copy of the user's directory (tests write recipes and runs into it)."""
    shutil.copytree(project_template, tmp_path, dirs_exist_ok=True)
    return tmp_path


def passed_report(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    gates = [g for s in report["stages"] for g in s.get("gates", [])]
    assert gates and all(g["passed"] for g in gates), gates
    return report


def test_journey_own_py_model_and_one_labelled_folder(project):
    init = fmap("init", "--model", "python:tinynet.py:tiny_net", "--data", "images", cwd=project)
    assert init.returncode == 0, init.stderr
    recipe = (project / "recipe.yaml").read_text()
    assert "input_shape: [1, 3, 24, 24]" in recipe and "max_accuracy_drop" in recipe
    check = fmap("validate", "recipe.yaml", "--build", cwd=project)
    assert check.returncode == 0, check.stderr
    # 30% / 70% of each class of 12 images: 4 + 8 per class, all 36 used once
    assert "data.calibration: 12 samples, labelled" in check.stdout and "data.eval: 24 samples" in check.stdout
    run = fmap("run", "recipe.yaml", *FAST, cwd=project)
    assert run.returncode == 0, run.stderr[-2000:]
    report = passed_report(project / "runs" / "tiny_net")
    verify = next(s for s in report["stages"] if s["id"] == "verify")
    assert verify["metrics"]["eval"]["has_labels"] is True


def test_journey_onnx_file_and_the_same_folder(project):
    assert fmap("init", "--model", "tiny.onnx", "--data", "images", cwd=project).returncode == 0
    assert "source: onnx:tiny.onnx" in (project / "recipe.yaml").read_text()
    run = fmap("run", "recipe.yaml", *FAST, cwd=project)
    assert run.returncode == 0, run.stderr[-2000:]
    report = passed_report(project / "runs" / "tiny")
    stages = {s["id"]: s for s in report["stages"]}
    prof = stages["profile"]["metrics"]
    assert prof["totals"]["graph_method"] == "onnx" and prof["memory"]["liveness_peak_bytes"] > 0
    assert [r["output_shape"] for r in prof["layers"] if r["type"] == "Conv"][0] == [1, 8, 24, 24]
    assert stages["export"]["metrics"]["onnx"]["source"] == "adopted"
    assert "onnx_int8" in stages["quantize"]["artifacts"]


def test_onnx_model_refuses_prune_before_running_anything(project):
    (project / "r.yaml").write_text("name: r\nmodel: {source: onnx:tiny.onnx}\nstages: [profile: {}, prune: {}]\n")
    out = fmap("validate", "r.yaml", "--build", cwd=project)
    assert out.returncode == 2
    assert "stage 'prune' needs a torch model" in out.stderr and "ONNX graph" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("key, value", [("ignore", "[no.such.layer]"),
                                        ("finetune", "{steps: 2, feature_layers: ['4', conv9]}")])
def test_misspelt_layer_name_fails_before_the_first_stage(project, key, value):
    (project / "r.yaml").write_text("name: r\nmodel: {source: 'python:tinynet.py:tiny_net', input_shape: [1, 3, 24, 24]}\n"
                                    f"stages: [profile: {{}}, prune: {{{key}: {value}}}]\n")
    name = "no.such.layer" if key == "ignore" else "conv9"
    for command in (["validate", "r.yaml", "--build"], ["run", "r.yaml"]):
        out = fmap(*command, cwd=project)
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and f"no layer named '{name}'" in last, out.stderr
        assert "[1/2] profile" not in out.stdout + out.stderr  # refused before the first stage ran


@pytest.mark.parametrize("spec", ["torchscript:tiny.ts", "exported:tiny.pt2"])
def test_compiled_models_profile_export_quantize_verify_visualize(project, spec):
    (project / "r.yaml").write_text(f"""\
name: r
model: {{source: "{spec}", input_shape: [1, 3, 24, 24]}}
data:
  calibration: &imgs {{source: imagefolder, path: images, transform: none, split: {{calibration: 0.5, eval: 0.5}}}}
  eval: *imgs
stages: [profile: {{}}, export: {{}}, quantize: {{}}, verify: {{gates: {{max_accuracy_drop: 0.05}}}},
         visualize: {{images: 4}}]
""")
    run = fmap("run", "r.yaml", *FAST, cwd=project)
    assert run.returncode == 0, run.stderr[-2000:]
    report = passed_report(project / "runs" / "r")
    prof = next(s for s in report["stages"] if s["id"] == "profile")["metrics"]
    assert prof["totals"]["graph_method"] == "onnx (exported view)" and prof["totals"]["macs"] > 0
    assert "compiled graph" in prof["redundancy_skipped"]
    visual = next(s for s in report["stages"] if s["id"] == "visualize")["metrics"]  # feature maps from ONNX
    assert visual["graph"] == "onnx" and visual["gradcam"].startswith("skipped:") and len(visual["layers"]) == 2  # both convs
    assert visual["similarity"]["onnx_int8"]["method"] == "featuremap"


@pytest.mark.slow  # 27 s; timm by name stays covered by tests/sources/test_model_sources.py
def test_journey_timm_model_by_name(project):
    pytest.importorskip("timm", reason="timm is an optional extra: pip install 'fmap[timm]'")
    init = fmap("init", "--model", "timm:test_resnet", cwd=project)
    assert init.returncode == 0, init.stderr
    recipe = (project / "recipe.yaml").read_text()
    assert "input_shape: [1, 3, 160, 160]" in recipe and "min_agreement" in recipe  # random data: no labels
    run = fmap("run", "recipe.yaml", *FAST, cwd=project)  # as written, at 160 px (FAST: fewer latency runs)
    assert run.returncode == 0, run.stderr[-2000:]
    passed_report(project / "runs" / "test_resnet")


@pytest.mark.parametrize("args,fragment", [
    (["init", "--model", "timm:resnet_18"], "did you mean resnet18"),
    (["init", "--model", "tinynet.py:tiny", "--data", "images"], "no callable 'tiny'"),
    (["profile", "onnx:tinynet.py"], "fails onnx.checker"),
    (["profile", "torchscript:tiny.onnx"], "not a TorchScript module"),
    (["run", "bad.yaml"], "importing 'broken.py' failed: ModuleNotFoundError"),
])
def test_bad_model_input_is_exit_2_with_one_line(project, args, fragment):
    if args[1].startswith("timm:"):
        pytest.importorskip("timm", reason="timm is an optional extra: pip install 'fmap[timm]'")
    (project / "broken.py").write_text("import no_such_dependency_xyz\n\ndef f():\n    pass\n")
    (project / "bad.yaml").write_text("name: bad\nmodel: {source: python:broken.py:f}\nstages: [profile: {}]\n")
    out = fmap(*args, cwd=project)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    if args[0] == "run":  # `fmap run` announces the recipe first
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], out.stderr
