"""How trials run. Each trial phase is one `python -m pipeline.cli run RECIPE --out DIR --resume --json`
in a fresh process, so a trial is an ordinary run directory, a crashing trial cannot take the sweep
down, and its threads are set before torch loads.

LocalExecutor: a pool of such subprocesses on this machine (the default).
RayExecutor:   each trial a Ray task declaring `num_cpus=threads`; the run directory must be on a
               filesystem the Ray workers share with the driver (true for a local Ray).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import BadInput
from pipeline.quiet import ENV as QUIET_ENV
from pipeline.quiet import QuietServer

LOG = "sweep.log"  # in each run directory: the trial's stderr, one section per phase


@dataclass(frozen=True)
class TrialTask:
    trial_id: str
    phase: str  # "prefix" (a shared prefix, once), "build" (stages before verify), "time" (serial) or "full"
    recipe: str  # the user's recipe file (so paths in it resolve as in a single `fmap run`)
    run_dir: str
    threads: int
    overrides: tuple[str, ...] = ()  # `--set` items of this phase
    stage_cache: str | None = None  # `fmap run --stage-cache`: stages shared with the other trials


@dataclass(frozen=True)
class TrialResult:
    trial_id: str
    phase: str
    exit_code: int
    seconds: float
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


def run_trial(task: TrialTask, quiet: QuietServer | None = None) -> TrialResult:
    """Run one phase of one trial as `fmap run RECIPE --set ... --resume` in a subprocess; never raises for a
    failing trial (its exit code and one-line error are returned). With `quiet` the trial runs in its own
    process group, which the server pauses while another trial measures latency (pipeline.quiet)."""
    run_dir = Path(task.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(task.threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.pop(QUIET_ENV, None)
    if quiet is not None:
        env[QUIET_ENV] = quiet.path
    sets = [arg for item in task.overrides for arg in ("--set", item)]
    cmd = [sys.executable, "-m", "pipeline.cli", "run", task.recipe, *sets, "--out", str(run_dir), "--resume", "--json"]
    if task.stage_cache:
        cmd += ["--stage-cache", task.stage_cache]
    t0 = time.perf_counter()
    with open(run_dir / LOG, "a", encoding="utf-8") as log:
        log.write(f"\n=== sweep phase '{task.phase}', {task.threads} thread(s): {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env, text=True,
                                start_new_session=quiet is not None)
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        if quiet is not None:
            quiet.register(proc.pid)
        try:
            stdout, _ = proc.communicate()
        finally:
            if quiet is not None:
                quiet.unregister(proc.pid)
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
    seconds = round(time.perf_counter() - t0, 3)
    error = None
    try:
        error = json.loads(stdout).get("error")
    except ValueError:  # no JSON: the run died before printing it (bad input, crash, signal)
        if proc.returncode != 0:
            error = _last_error_line(run_dir / LOG) or f"exited with code {proc.returncode}"
    return TrialResult(task.trial_id, task.phase, proc.returncode, seconds, error)


def _last_error_line(log: Path) -> str | None:
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [None])[-1]


def interrupt_running(quiet: QuietServer | None = None) -> None:
    """Ctrl-C of the sweep: ask every running trial to stop (it leaves a resumable run directory)."""
    if quiet is not None:
        quiet.resume_all()  # a paused trial would not see the signal
    with _RUNNING_LOCK:
        procs = list(_RUNNING)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes: Ray retries an unreachable address for a long time."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BadInput(f"--address '{address}': expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise BadInput(f"--executor ray: Ray at '{address}' is unreachable: {exc.strerror or exc}") from None


class Executor(Protocol):
    name: str

    def run(self, tasks: list[TrialTask], workers: int) -> Iterator[TrialResult]:
        """Run tasks, at most `workers` at once; yield each result as it finishes."""
        ...


class LocalExecutor:
    """A pool of subprocesses on this machine (threads only wait on their child process). With `quiet`,
    a trial's latency is measured while the others are paused (pipeline.quiet)."""

    name = "local"

    def __init__(self, quiet: QuietServer | None = None) -> None:
        self.quiet = quiet

    def run(self, tasks: list[TrialTask], workers: int) -> Iterator[TrialResult]:
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fmap-trial")
        futures: set[Future] = {pool.submit(run_trial, t, self.quiet) for t in tasks}
        try:
            while futures:
                done, futures = wait(futures, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            interrupt_running(self.quiet)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Each trial phase a Ray task with `num_cpus=threads`; at most `workers` in flight."""

    name = "ray"

    def __init__(self, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise BadInput("--executor ray: Ray is not installed (pip install 'fmap[ray]')") from None
        self.ray = ray
        self.address = address
        if address not in (None, "auto", "local"):
            _check_reachable(address)
        try:
            if not ray.is_initialized():
                local = {"_node_ip_address": "127.0.0.1", "num_cpus": os.cpu_count()} if address is None else {}
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False, ignore_reinit_error=True, **local)
        except Exception as exc:  # ConnectionError, RuntimeError, ValueError depending on the address form
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise BadInput(f"--executor ray: cannot connect to Ray at '{address or 'a new local cluster'}': {first}") from None

    def run(self, tasks: list[TrialTask], workers: int) -> Iterator[TrialResult]:
        ray = self.ray
        remote = ray.remote(run_trial)
        pending = list(tasks)
        in_flight: dict[Any, TrialTask] = {}
        try:
            while pending or in_flight:
                while pending and len(in_flight) < max(1, workers):
                    t = pending.pop(0)
                    in_flight[remote.options(num_cpus=t.threads, max_retries=0).remote(t)] = t
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    t = in_flight.pop(ref)
                    try:
                        yield ray.get(ref)
                    except Exception as exc:  # the task itself died (worker lost): a failed trial
                        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                        yield TrialResult(t.trial_id, t.phase, 3, 0.0, f"Ray task failed: {first}")
        except BaseException:
            for ref in in_flight:
                ray.cancel(ref, force=False)
            raise

    def close(self) -> None:
        self.ray.shutdown()
