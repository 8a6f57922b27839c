"""Keep third-party chatter out of the console: it goes to the run's `run.log` instead.

Libraries print and log as they please: onnxruntime's calibrator prints "Collecting tensor data
and making histogram ...", its QDQ debugger logs `ERROR:root:Model Error ...` through the root
logger (which, with no handler, lazily installs one on stderr), and torch warns. During a run the
root logger, Python warnings and `print` to stdout are routed into `run.log`, so the console shows
fmap's own progress and the log keeps everything for whoever needs it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def capture_third_party(log_path: Path) -> Iterator[Path]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    stream = handler.stream
    try:
        with contextlib.redirect_stdout(stream):
            yield log_path
    finally:
        logging.captureWarnings(False)
        root.handlers = saved_handlers
        root.setLevel(saved_level)
        handler.close()
        sys.stdout.flush()
