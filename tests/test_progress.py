"""Progress without a terminal (CI logs) and third-party output kept out of the console."""

from __future__ import annotations

import io
import logging
import re
import time
import warnings

from rich.console import Console

from pipeline.progress import HeartbeatStatus, LogConsole, Ticker, counter
from pipeline.runlog import capture_third_party


def log_console() -> tuple[LogConsole, io.StringIO]:
    buf = io.StringIO()
    return LogConsole(file=buf, width=200, force_terminal=False), buf


def test_status_without_terminal_prints_timestamped_heartbeats():
    console, buf = log_console()
    status = console.status("calibrating (minmax, 64 samples)")
    assert isinstance(status, HeartbeatStatus)
    status.interval = 0.05
    with status:
        time.sleep(0.3)
    lines = buf.getvalue().splitlines()
    assert re.match(r"^\[\d\d:\d\d:\d\d\] calibrating \(minmax, 64 samples\) \.\.\.$", lines[0])
    assert any("still running" in ln for ln in lines[1:-1])
    assert re.search(r"calibrating \(minmax, 64 samples\): done in 0\.\d s$", lines[-1])


def test_ticker_counts_rate_and_eta_and_is_rate_limited():
    buf = io.StringIO()
    console = Console(file=buf, width=200)
    ticker = Ticker(console, "channel statistics", 64, "samples", interval=3600)
    for _ in range(4):
        ticker.advance(16)
    assert buf.getvalue() == ""  # nothing before the interval: a log line at most every INTERVAL s
    assert re.match(r"channel statistics: 64/64 samples \(100%\), [\d.]+ samples/s, ETA 0 s", ticker.line())
    ticker.interval = 0
    ticker.advance(0)
    ticker.finish()
    out = buf.getvalue().splitlines()
    assert "64/64 samples" in out[0] and out[-1].endswith(" s") and "64 samples in" in out[-1]


def test_counter_in_a_log_reports_the_real_total():
    console, buf = log_console()
    with counter(console, "fine-tune", 10, "steps") as advance:
        for _ in range(10):
            advance(1)
    text = buf.getvalue()
    assert "fine-tune: 10 steps ..." in text and "fine-tune: 10 steps in" in text


def test_third_party_prints_logs_and_warnings_go_to_the_run_log(tmp_path, capsys):
    log = tmp_path / "run.log"
    with capture_third_party(log):
        print("Collecting tensor data and making histogram ...")
        logging.error("Model Error in 'x.onnx': weight tensor 'w' not found!")
        warnings.warn("a library deprecation", DeprecationWarning, stacklevel=1)
    captured = capsys.readouterr()
    assert "Collecting" not in captured.out + captured.err and "Model Error" not in captured.out + captured.err
    text = log.read_text()
    assert "Collecting tensor data" in text and "ERROR root: Model Error" in text
    assert "a library deprecation" in text
    print("after")  # stdout is restored
    assert capsys.readouterr().out == "after\n"
