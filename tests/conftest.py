"""Shared fixtures: tiny models and a StageContext builder, so stage tests stay fast."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from rich.console import Console

from pipeline.sources.data import DataBundle, TensorSplit
from pipeline.stages.base import StageContext


def pytest_collection_modifyitems(config, items):
    """GPU tests skip with a reason where CUDA is absent (they are deselected by default too)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class TinyCNN(torch.nn.Module):
    """conv-bn-relu x2, a residual add, pooling, linear: enough structure for every stage."""

    def __init__(self, in_ch: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(in_ch, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.conv3 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(self.conv1(x)))
        b = torch.relu(self.bn2(self.conv2(a)) + a)
        c = torch.relu(self.conv3(b))
        return self.fc(torch.flatten(self.pool(c), 1))


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture
def tiny_data() -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 16, 16, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    split = TensorSplit("tiny", x, y, batch_size=16, num_classes=10)
    return DataBundle(calibration=split, eval=split, train=split)


@pytest.fixture
def make_ctx(tmp_path: Path):
    """Build a StageContext around any model/data without a recipe (no model_spec)."""

    def _make(model: torch.nn.Module, data: DataBundle, example_input: torch.Tensor | None = None,
              run_dir: Path | None = None) -> StageContext:
        import copy

        if example_input is None:
            split = data.calibration or data.eval
            example_input = split.first_batch(1)[0]
        return StageContext(
            run_dir=run_dir or tmp_path / "run",
            model=model,
            original_model=copy.deepcopy(model).eval(),
            example_input=example_input,
            data=data,
            console=Console(stderr=True, force_terminal=False),
        )

    return _make


def run_quantize(ctx: StageContext, cfg: Any) -> Any:
    """What a recipe's `- export: {}` then `- quantize: ...` does: the FP32 file first (recorded as the
    runner records artifacts), then quantize. Quantize no longer exports on its own."""
    from pipeline.stages.export import FP32_NAME, ExportConfig, ExportStage
    from pipeline.stages.quantize import QuantizeStage

    if FP32_NAME not in ctx.artifacts:
        ctx.artifacts.update(ExportStage().run(ctx, ExportConfig()).artifacts)
    return QuantizeStage().run(ctx, cfg)


TINY_RECIPE = """
name: tiny-sweep
seed: 0
threads: 1
model: {source: "builtin:digits_cnn", input_shape: [1, 1, 32, 32]}
data:
  calibration: {source: builtin, split: calibration, batch_size: 32, samples: 32}
  eval: {source: builtin, split: test, batch_size: 64, samples: 64}
stages:
  - export: {}
  - quantize: {mode: static, calibration: minmax}
  - verify:
      backends: [onnxruntime]
      latency: {batch_sizes: [1], warmup: 1, iterations: 5}
      gates: {min_agreement: 0.5}
"""


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    """A whole recipe in seconds (export, static INT8, verify on onnxruntime): sweeps, stage cache."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


ROOT = Path(__file__).resolve().parents[1]
# Cheaper latency statistics than the recipe's; everything else as `make demo` runs it.
QUICKSTART_FAST = ["--set", "stages.verify.latency.iterations=10", "--set", "stages.verify.latency.warmup=2"]


class TimedRun(NamedTuple):
    out: Path  # the run directory
    proc: subprocess.CompletedProcess[str]
    line_times: list[float]  # seconds since start at which each stderr line arrived


def run_timed(args: list[str], cwd: Path, timeout: float) -> tuple[subprocess.CompletedProcess[str], list[float]]:
    """Run `fmap ARGS` without a terminal (CI=1, pipes), timing when each stderr line arrives,
    as a CI log viewer would see it."""
    env = dict(os.environ, CI="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    times: list[float] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            times.append(time.monotonic() - t0)
            lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    proc.wait(timeout=timeout)
    reader.join()
    times.append(time.monotonic() - t0)  # the exit ends the last gap
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, "".join(lines)), times


@pytest.fixture(scope="session")
def quickstart_timed(tmp_path_factory) -> TimedRun:
    """One `fmap run recipes/quickstart.yaml` per test session, shared by the end-to-end tests and the
    docs-that-run test (which copies it wherever a doc names a run directory). Do not modify it."""
    out = tmp_path_factory.mktemp("e2e") / "quickstart"
    proc, times = run_timed(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(out), "--json",
                             *QUICKSTART_FAST], ROOT, timeout=1100)
    return TimedRun(out, proc, times)


@pytest.fixture(scope="session")
def quickstart_run(quickstart_timed) -> tuple[Path, subprocess.CompletedProcess[str]]:
    return quickstart_timed.out, quickstart_timed.proc


def tiny_factory() -> torch.nn.Module:
    """2 classes, 3x8x8 inputs: the `python:` model source of the runner, run-directory and bad-input tests."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 2))
