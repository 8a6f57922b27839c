"""Progress that works both in a terminal and in a CI log.

In a terminal, rich's live spinners and bars. Without one (CI, a redirected log), live displays
print nothing until they end, so a long step looks hung: there, plain timestamped lines instead,
at most every `INTERVAL` seconds, with real counts, rate and ETA for counted loops, and a
heartbeat ("still running, 40 s") for single long calls such as INT8 calibration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

INTERVAL = 10.0  # seconds between log lines; the goal is no 30-second gap in a CI log


def stamp() -> str:
    return time.strftime("%H:%M:%S")


class HeartbeatStatus:
    """`console.status(...)` for logs: a start line, a line every INTERVAL s while it runs, an end line."""

    def __init__(self, console: Console, text: str, interval: float = INTERVAL) -> None:
        self.console, self.text, self.interval = console, text, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _say(self, msg: str) -> None:
        self.console.print(f"[{stamp()}] {msg}", markup=False, highlight=False)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self._say(f"{self.text}: still running, {time.monotonic() - self._t0:.0f} s")

    def update(self, status: Any = None, **_: Any) -> None:  # rich's Status API
        if status is not None:
            self.text = str(status)
            self._say(f"{self.text} ...")

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._say(f"{self.text} ...")
        self._thread = threading.Thread(target=self._beat, name="fmap-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._say(f"{self.text}: done in {time.monotonic() - self._t0:.1f} s")

    def __enter__(self) -> HeartbeatStatus:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class LogConsole(Console):
    """A rich Console whose `status()` becomes a heartbeat where there is no terminal."""

    def status(self, status: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if self.is_terminal:
            return super().status(status, *args, **kwargs)
        return HeartbeatStatus(self, str(status))


class Ticker:
    """Counted progress for logs: `label: 128/512 samples (25%), 40.1/s, ETA 9 s`, rate-limited."""

    def __init__(self, console: Console, label: str, total: int | None, unit: str, interval: float = INTERVAL) -> None:
        self.console, self.label, self.total, self.unit, self.interval = console, label, total, unit, interval
        self.done = 0
        self._t0 = self._last = time.monotonic()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = self.done / elapsed
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            return (f"{self.label}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                    f"{rate:.1f} {self.unit}/s, ETA {left:.0f} s")
        return f"{self.label}: {self.done} {self.unit}, {rate:.1f} {self.unit}/s"

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.console.print(f"[{stamp()}] {self.line()}", markup=False, highlight=False)

    def finish(self) -> None:
        elapsed = time.monotonic() - self._t0
        self.console.print(f"[{stamp()}] {self.label}: {self.done} {self.unit} in {elapsed:.1f} s",
                           markup=False, highlight=False)


@contextmanager
def counter(console: Console, label: str, total: int | None, unit: str = "samples") -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`: a transient bar in a terminal, timestamped lines in a log."""
    if console.is_terminal:
        from rich.progress import Progress

        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(label, total=total or None)
            yield lambda n=1: bar.advance(task, n)
        return
    ticker = Ticker(console, label, total, unit)
    console.print(f"[{stamp()}] {label}: {total if total else '?'} {unit} ...", markup=False, highlight=False)
    yield ticker.advance
    ticker.finish()
