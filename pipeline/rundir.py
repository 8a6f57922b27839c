"""The run directory's housekeeping: one writer at a time, no orphans, no stale reports.

- `RunDirLock`: an exclusive `flock` on `<run_dir>/.fmap.lock` holding the owner's pid. The kernel
  drops a flock when its process dies (SIGKILL included), so a lock file left by a dead run is
  simply taken over; a finished run removes it; a live one makes the second `fmap run` fail with exit 2 naming the pid.
- `remove_orphans`: temp files and folders of a killed run (every fmap temp name contains
  `TEMP_MARK`, see pipeline.atomic) are deleted once the lock is held, so none can belong to a
  live writer.
- `remove_stale_reports`: the reports of an earlier run go before a new run starts, so a crashed
  run never sits beside a previous run's green report.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

from pipeline.atomic import TEMP_MARK
from pipeline.errors import BadInput

LOCK_FILE = ".fmap.lock"
REPORT_FILES = ("report.json", "report.md", "report.html", "junit.xml", "error.log", "report-error.log")
LEGACY_TEMP_DIRS = ("*.export",)  # fixed temp folder names of fmap <= 0.1 (".model_fp32.export")


class RunDirLock:
    """Exclusive, non-blocking lock on a run directory for the life of one `fmap run`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise BadInput(f"run directory {self.run_dir} is a file; choose a folder with --out")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInput(f"cannot create run directory {self.run_dir}: {exc.strerror or exc}") from None
        fd = try_lock(self.path)
        if fd is None:
            owner = read_pid(self.path)
            who = f"pid {owner}" if owner else "another process"
            raise BadInput(f"run directory {self.run_dir} in use by {who} (another fmap run writes there; "
                           "wait for it or choose another --out)")
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            unlock(self.path, self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_lock(path: Path) -> int | None:
    """An exclusive, non-blocking `flock` on the file at `path` (created if missing) with this
    process's pid written in it; the fd, or None while another process holds it. The kernel drops
    the lock when its holder dies, so a crashed holder blocks nobody."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            return None
        try:  # the holder we waited on may have unlinked the file: lock the one at the path
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def unlock(path: Path, fd: int) -> None:
    """Release `try_lock`'s lock, removing the file while still holding it (no lock file stays behind)."""
    try:
        Path(path).unlink(missing_ok=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def remove_orphans(run_dir: Path) -> list[Path]:
    """Delete temp files/folders left by a killed run (call only while holding the lock)."""
    removed: list[Path] = []
    run_dir = Path(run_dir)
    candidates = [p for p in run_dir.rglob(f"*{TEMP_MARK}*")]
    for pattern in LEGACY_TEMP_DIRS:
        candidates += [p for p in run_dir.rglob(f".{pattern}") if p.is_dir()]
    for p in sorted(set(candidates), key=lambda q: len(q.parts)):
        if not p.exists() and not p.is_symlink():
            continue  # inside a folder removed just before
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def remove_stale_reports(run_dir: Path) -> list[Path]:
    """Delete the reports and error logs of an earlier run of this directory."""
    from pipeline.report import report_filenames  # lazy: plug-in formats count too

    removed = []
    for name in dict.fromkeys([*REPORT_FILES, *report_filenames()]):
        p = Path(run_dir) / name
        if p.is_file():
            p.unlink()
            removed.append(p)
    return removed


RESERVE_FILE = f".fmap.reserve{TEMP_MARK}"  # carries the temp mark: a killed run's reserve is an orphan
RESERVE_BYTES = (64 * 1024, 16 * 1024)  # a failed run's manifest is ~16 KB (quickstart's full one ~70 KB)


class SpaceReserve:
    """Disk space held back while a run writes, given up to write the final manifest on disk full.

    Without it a full disk leaves `manifest.json` at "running" forever (the final write has no
    room either). The reserve is created when the run starts (when there is room) and deleted
    just before the final status is written after an ENOSPC, and always at the end.
    """

    def __init__(self, run_dir: Path, sizes: tuple[int, ...] = RESERVE_BYTES) -> None:
        self.path = Path(run_dir) / RESERVE_FILE
        self.sizes = sizes
        self.held = False

    def hold(self) -> bool:
        for size in self.sizes:
            try:
                with open(self.path, "wb") as fh:
                    fh.write(b"\0" * size)  # real blocks (a sparse file would free nothing)
                    fh.flush()
                    os.fsync(fh.fileno())
                self.held = True
                return True
            except OSError:  # not that much room: try less, or hold nothing back
                self.path.unlink(missing_ok=True)
        return False

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        self.held = False
