"""pipeline.quiet: a trial measuring latency pauses the sweep's other trials, and they continue after
it closes or dies; without a sweep it does nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import quiet

# A stand-in for a building trial: counts as fast as it can, writing the count to a file.
COUNTER = """
import sys, time
n, path = 0, sys.argv[1]
while True:
    n += 1
    if n % 2000 == 0:
        with open(path, "w") as f:
            f.write(str(n))
    time.sleep(0)
"""


def _count(path: Path) -> int:
    for _ in range(100):
        try:
            return int(path.read_text())
        except (OSError, ValueError):  # not written yet, or mid-write
            time.sleep(0.02)
    raise AssertionError(f"{path} never written")


def _advances(path: Path, seconds: float = 0.4) -> bool:
    before = _count(path)
    time.sleep(seconds)
    return _count(path) != before


@pytest.fixture
def server():
    s = quiet.QuietServer()
    yield s
    s.close()


@pytest.fixture
def building(tmp_path: Path, server: quiet.QuietServer):
    """A registered 'trial' in its own process group, like the sweep's executor starts them."""
    path = tmp_path / "count"
    proc = subprocess.Popen([sys.executable, "-c", COUNTER, str(path)], start_new_session=True)
    server.register(proc.pid)
    _count(path)
    yield proc, path
    server.unregister(proc.pid)
    proc.kill()
    proc.wait()


def test_no_sweep_no_pause(monkeypatch):
    monkeypatch.delenv(quiet.ENV, raising=False)
    with quiet.quiet_machine() as paused:
        assert paused is None


def test_the_others_are_paused_while_one_times_and_continue_after(server, building, monkeypatch):
    proc, path = building
    monkeypatch.setenv(quiet.ENV, server.path)
    assert _advances(path) and not quiet._all_stopped(proc.pid)
    with quiet.quiet_machine() as paused:
        assert paused == 1 and quiet._all_stopped(proc.pid)  # stopped before the answer, not just signalled
        assert not _advances(path)
    assert _advances(path)
    assert server.grants == 1


def test_a_trial_started_while_another_times_is_paused_at_once(server, tmp_path, monkeypatch):
    monkeypatch.setenv(quiet.ENV, server.path)
    path = tmp_path / "late"
    with quiet.quiet_machine() as paused:
        assert paused == 0
        proc = subprocess.Popen([sys.executable, "-c", COUNTER, str(path)], start_new_session=True)
        server.register(proc.pid)
        time.sleep(1.0)
        assert not path.exists()  # stopped before it wrote anything
    try:
        assert _count(path) > 0
    finally:
        server.unregister(proc.pid)
        proc.kill()
        proc.wait()


def test_a_timing_trial_that_dies_releases_the_others(server, building):
    """The connection closes with the process: the paused trial continues."""
    _, path = building
    holder = subprocess.run(
        [sys.executable, "-c", "import os\nfrom pipeline import quiet\n"
         "with quiet.quiet_machine() as n:\n    print(n, flush=True)\n    os._exit(9)"],
        env={**os.environ, quiet.ENV: server.path, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True, text=True, timeout=60)
    assert holder.returncode == 9 and holder.stdout.strip() == "1"
    assert _advances(path, 1.0)


def test_close_resumes_everyone(server, building, monkeypatch):
    """The sweep interrupted (or done) while one trial times: nothing stays stopped."""
    _, path = building
    monkeypatch.setenv(quiet.ENV, server.path)
    with quiet.quiet_machine():
        time.sleep(0.1)
        assert not _advances(path)
        server.resume_all()
        assert _advances(path)
