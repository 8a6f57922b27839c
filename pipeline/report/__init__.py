"""Reports of a run, all regenerated from `<run_dir>/manifest.json` (`fmap report` does the same).

`write_reports` is what the runner calls at the end of every run, gate failure included.
"""

from __future__ import annotations

import json as _json  # aliased: the submodule pipeline.report.json would shadow `json`
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json, write_text
from pipeline.errors import BadInput

FORMATS: dict[str, str] = {"json": "report.json", "md": "report.md", "html": "report.html", "junit": "junit.xml"}


def load_manifest(run_dir: Path) -> dict[str, Any]:
    """Read manifest.json; a missing or unreadable one is the user's input error (exit 2)."""
    run_dir = Path(run_dir)
    path = run_dir / "manifest.json"
    if not run_dir.is_dir():
        raise BadInput(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise BadInput(f"{path} not found: is {run_dir} an fmap run directory?")
    try:
        manifest = _json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, _json.JSONDecodeError) as exc:
        raise BadInput(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages", []), list):
        raise BadInput(f"{path} is not an fmap manifest (expected an object with a 'stages' list)")
    return manifest


def write_reports(run_dir: Path, formats: tuple[str, ...] | list[str] = ("json", "md", "html", "junit")
                  ) -> dict[str, Path]:
    """Write the requested report files atomically into run_dir; returns {format: path}."""
    from pipeline.report.json import build_report

    run_dir = Path(run_dir)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise BadInput(f"unknown report format(s) {', '.join(unknown)} (choose from {', '.join(FORMATS)})")
    report = build_report(load_manifest(run_dir))
    written: dict[str, Path] = {}
    for fmt in formats:
        path = run_dir / FORMATS[fmt]
        if fmt == "json":
            write_json(path, report)
        elif fmt == "md":
            from pipeline.report.markdown import render_markdown

            write_text(path, render_markdown(report))
        elif fmt == "html":
            from pipeline.report.html import render_html

            write_text(path, render_html(report, run_dir))
        else:
            from pipeline.report.junit import render_junit

            write_text(path, render_junit(report))
        written[fmt] = path
    return written
