"""A quiet machine for latency in a parallel sweep: the trial that times asks the sweep to pause the others.

Trials of `fmap sweep` build in parallel, but a latency measured while another trial computes is
a measurement of the contention. Instead of a second, serial process per trial for the timing
(which repeats process start, model load and everything after verify), each trial is one
`fmap run`, and its verify stage (and quantize's quick latency look) wraps its latency loops in
`quiet_machine()`: the sweep then stops every other running trial (SIGSTOP to its process group:
it keeps its memory and gets no CPU time), answers, and continues them (SIGCONT) once the timing
trial closes the connection, or dies.
One trial times at a time; a trial started while another times is stopped at once.

The sweep's local executor runs a `QuietServer` on a Unix socket and passes its path in
FMAP_QUIET_SOCKET; without that variable (a plain `fmap run`, Ray) `quiet_machine()` does nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ENV = "FMAP_QUIET_SOCKET"


@contextlib.contextmanager
def quiet_machine() -> Iterator[int | None]:
    """Hold the sweep's other trials paused for the body; yields how many were paused (None: no sweep)."""
    path = os.environ.get(ENV)
    if not path:
        yield None
        return
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        conn.sendall(f"{os.getpgid(0)}\n".encode())
        reply = conn.makefile("r").readline().split()
    except OSError:  # the sweep is gone or never listened: time as a plain run would
        conn.close()
        yield None
        return
    try:
        yield int(reply[1]) if len(reply) == 2 and reply[0] == "go" else None
    finally:
        conn.close()  # the server continues the others on EOF


def runnable_now() -> int | None:
    """Runnable threads on the machine this instant (/proc/loadavg's 4th field), where Linux tells;
    the 1-minute load average still remembers the trials paused a moment ago."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


class QuietServer:
    """The sweep's side: knows the running trials' process groups; pauses all but one on request."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="fmap-quiet-")  # short: Unix socket paths are limited to ~100 bytes
        self.path = os.path.join(self._dir, "s")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(16)
        self._lock = threading.Lock()
        self._groups: set[int] = set()
        self._paused: set[int] = set()
        self._holder: int | None = None
        self.grants = 0  # how many timings were served
        self._thread = threading.Thread(target=self._serve, name="fmap-quiet", daemon=True)
        self._thread.start()

    def register(self, pgid: int) -> None:
        """A trial's process group started; stopped at once when another trial is timing."""
        with self._lock:
            self._groups.add(pgid)
            if self._holder is not None and pgid != self._holder:
                self._signal(pgid, signal.SIGSTOP)
                self._paused.add(pgid)

    def unregister(self, pgid: int) -> None:
        with self._lock:
            self._groups.discard(pgid)
            self._paused.discard(pgid)

    def resume_all(self) -> None:
        """Continue every paused trial (before the sweep interrupts them: a stopped one cannot stop)."""
        with self._lock:
            for pgid in self._paused:
                self._signal(pgid, signal.SIGCONT)
            self._paused.clear()

    def close(self) -> None:
        self.resume_all()
        with contextlib.suppress(OSError):
            self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            with conn:
                self._grant(conn)

    def _grant(self, conn: socket.socket) -> None:
        """One timing: pause the others, say go, wait for the timing trial to close (or die), continue them."""
        try:
            holder = int(conn.makefile("r").readline().strip() or -1)
        except (OSError, ValueError):
            return
        with self._lock:
            self._holder = holder
            others = self._groups - {holder} - self._paused
            for pgid in others:
                self._signal(pgid, signal.SIGSTOP)
            self._paused |= others
            self.grants += 1
        _wait_stopped(others)
        try:
            conn.sendall(f"go {len(others)}\n".encode())
            while conn.recv(4096):  # EOF when the trial closes the connection or exits
                pass
        except OSError:
            pass
        finally:
            with self._lock:
                self._holder = None
            self.resume_all()

    @staticmethod
    def _signal(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def _wait_stopped(pids: set[int], timeout: float = 1.0) -> None:
    """SIGSTOP is delivered asynchronously: wait (briefly) until every thread of each paused trial's
    main process is stopped, so the timing starts on a machine that is already quiet (Linux /proc;
    elsewhere, no wait)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline and not _all_stopped(pid):
            time.sleep(0.005)


def _all_stopped(pid: int) -> bool:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        # the state is the field after the parenthesised command name
        return all(t.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] in "Tt" for t in tasks)
    except (OSError, IndexError):  # gone, or no /proc: nothing to wait for
        return True
