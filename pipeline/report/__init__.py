"""Reports of a run, all regenerated from `<run_dir>/manifest.json` (`fmap report` does the same).

`write_reports` is what the runner calls at the end of every run, gate failure included. Every
format is registered by its own module with `@report_format(name, filename)` on a
`render(report, run_dir) -> str` function (report.json in document.py, report.md in markdown.py,
report.html in html.py, junit.xml in junit.py); a plug-in file adds one the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.atomic import write_text
from pipeline.errors import BadInput
from pipeline.registry import Registry

Render = Callable[[dict[str, Any], Path], str]


@dataclass(frozen=True)
class ReportFormat:
    name: str
    filename: str  # written into the run directory
    render: Render


# Built-ins: the modules of this package register their formats when imported.
REPORT_FORMATS: Registry[ReportFormat] = Registry("report format", "pipeline.report",
                                                  order=("json", "md", "html", "junit"))


def report_format(name: str, filename: str) -> Callable[[Render], Render]:
    """Register the decorated `render(report, run_dir) -> str` as report format `name`."""

    def wrap(render: Render) -> Render:
        REPORT_FORMATS.add(name, ReportFormat(name, filename, render))
        return render

    return wrap


def report_filenames() -> list[str]:
    return [f.filename for _, f in REPORT_FORMATS.items()]


def load_manifest(run_dir: Path) -> dict[str, Any]:
    """Read manifest.json; a missing or unreadable one is the user's input error (exit 2)."""
    run_dir = Path(run_dir)
    path = run_dir / "manifest.json"
    if not run_dir.is_dir():
        raise BadInput(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise BadInput(f"{path} not found: is {run_dir} an fmap run directory?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages", []), list):
        raise BadInput(f"{path} is not an fmap manifest (expected an object with a 'stages' list)")
    return manifest


def write_reports(run_dir: Path, formats: Sequence[str] | None = None) -> dict[str, Path]:
    """Write the requested report files (default: every registered format) atomically into
    run_dir; returns {format: path}."""
    from pipeline.report.document import build_report

    run_dir = Path(run_dir)
    chosen = [REPORT_FORMATS.get(f) for f in (REPORT_FORMATS.names() if formats is None else formats)]
    report = build_report(load_manifest(run_dir))
    return {f.name: write_text(run_dir / f.filename, f.render(report, run_dir)) for f in chosen}
