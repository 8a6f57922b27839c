"""Render report.html in headless Chromium: a screenshot for the docs, and a console-error check.

    python -m pipeline.report.screenshot RUN_DIR [--out docs/report-screenshot.png]

Chromium runs fully offline (--disable-background-networking); the report has no external
resources, so any network attempt or script error would show in the console log.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-dev-shm-usage", "--hide-scrollbars"]


def chromium() -> str | None:
    """Path of a Chromium binary, or None (callers skip with that reason)."""
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) or (name if os.path.isfile(name) else None)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout)


def dump_dom(html_path: Path, timeout: float = 60) -> tuple[str, list[str]]:
    """(rendered DOM, console error lines) for the page."""
    proc = _run(["--enable-logging=stderr", "--v=0", "--dump-dom", Path(html_path).resolve().as_uri()], timeout)
    errors = [ln for ln in proc.stderr.splitlines()
              if "CONSOLE" in ln and re.search(r"error|Uncaught|Failed to load", ln, re.I)]
    return proc.stdout, errors


def screenshot(html_path: Path, out: Path, width: int = 1280, height: int = 1600, timeout: float = 60) -> Path:
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = _run([f"--screenshot={out}", f"--window-size={width},{height}", Path(html_path).resolve().as_uri()],
                timeout)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot: {proc.stderr[-500:]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/report-screenshot.png"))
    args = ap.parse_args()
    html = args.run_dir / "report.html"
    if not html.is_file():
        from pipeline.report import write_reports

        write_reports(args.run_dir, ("html",))
    _, errors = dump_dom(html)
    for e in errors:
        print("console error:", e)
    print(screenshot(html, args.out))
    raise SystemExit(1 if errors else 0)


if __name__ == "__main__":
    main()
