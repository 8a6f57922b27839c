"""A plug-in as a user would write it: one file registering a backend, a prune criterion, a model
source and a report format (loaded by tests/test_plugins.py through `plugins:`, --plugin and
$FMAP_PLUGINS). Not a test module: pytest collects test_*.py only."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from pipeline.backends import onnxruntime as ort
from pipeline.backends.base import backend
from pipeline.pruning.importance import criterion
from pipeline.report import report_format
from pipeline.sources.registry import BuildContext, model_source


@backend("ort_basic", loads=("onnx",), available=ort.available)
def load_ort_basic(path: str | Path, threads: int, precision_hint: str | None = None, **opts: Any) -> Any:
    """onnxruntime with basic graph optimisations only: same numbers, fewer fusions."""
    session = ort.load(path, threads, precision_hint, optimization="basic")
    session.backend = "ort_basic"
    return session


@criterion("random")
def random_importance(model: Any, stats: Any, correlation_aware: bool) -> Any:
    """A baseline that any real criterion should beat."""
    import torch_pruning as tp

    return tp.importance.RandomImportance()


@model_source("plugnet", "plugnet:WIDTH")
def build_plugnet(rest: str, kwargs: dict[str, Any], ctx: BuildContext) -> Any:
    import torch

    width = int(rest)
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 4))


@report_format("csv", "report.csv")
def render_csv(report: dict[str, Any], run_dir: Path | None = None) -> str:
    """One row per artifact x backend: the numbers a spreadsheet wants."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["artifact", "backend", "agreement"])
    for row in report["artifacts"]:
        writer.writerow([row.get("artifact"), row.get("backend"), row.get("agreement")])
    return out.getvalue()
