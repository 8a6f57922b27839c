"""A content-addressed store of finished stages, shared by runs (`fmap run --stage-cache DIR`).

A stage's key is its chain hash, the same hash `--resume` compares (pipeline.fingerprint): the
inputs on disk, the seed, and the config of this stage and of every stage before it. Runs whose
recipes agree up to a stage therefore share that stage: the first run to finish it publishes the
files it wrote, later runs copy them into their own run directory and restore the stage from them
instead of recomputing it (how a sweep runs profile/prune/export once for trials that differ only in
quantize settings).

    DIR/<chain hash>/entry.json   the stage's manifest entry, the run it came from, its files
    DIR/<chain hash>/files/...    every file the stage wrote, at its path relative to the run dir
    DIR/.<chain hash>.claim       locked by a run computing that stage now: others wait for it (claim())

Files are copied, never hard-linked: a run that later re-runs the stage rewrites its own files, and
must not rewrite the cache's. An entry appears by one rename, so a reader never sees half of one;
two runs publishing the same hash keep the first. The stage's artifacts are checked against their
sha256 after the copy, as `--resume` checks them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import atomic
from pipeline.atomic import TEMP_MARK
from pipeline.rundir import read_pid, try_lock, unlock

ENTRY = "entry.json"
# Files of the run, not of a stage: never published.
RUN_FILES = frozenset({"manifest.json", "run.log", "recipe.lock.yaml", ".fmap.lock", "sweep.log", "error.log",
                       "report.json", "report.md", "report.html", "junit.xml", "report-error.log", "qa.html"})


def snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of the files in a run directory that a stage may have written."""
    out = {}
    for p in Path(run_dir).rglob("*"):
        rel = p.relative_to(run_dir).as_posix()
        if rel in RUN_FILES or TEMP_MARK in rel or not p.is_file() or p.is_symlink():
            continue
        st = p.stat()
        out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def written_since(before: dict[str, tuple[int, int]], run_dir: Path) -> list[str]:
    """The files created or rewritten since `before` (a stage's outputs)."""
    return sorted(rel for rel, sig in snapshot(run_dir).items() if before.get(rel) != sig)


def publish(cache: Path, chain: str, entry: dict[str, Any], run_dir: Path, files: list[str]) -> bool:
    """Store a finished stage under its chain hash; False when it is there already."""
    dest = Path(cache) / chain
    if (dest / ENTRY).is_file():
        return False
    tmp = Path(cache) / f".{chain}{TEMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "files").mkdir(parents=True)
    try:
        for rel in files:
            target = tmp / "files" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(run_dir) / rel, target)
        keep = {k: entry.get(k) for k in ("id", "kind", "status", "skip_reason", "duration_s", "started", "config",
                                          "chain_hash", "metrics", "artifacts", "gates")}
        atomic.write_json(tmp / ENTRY, {**keep, "run_dir": str(run_dir), "files": files})
        try:
            os.rename(tmp, dest)  # atomic; fails when another run published the same stage first
        except OSError:
            return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(cache: Path, chain: str, run_dir: Path) -> dict[str, Any] | None:
    """Copy a cached stage's files into `run_dir`; its stored entry, or None when there is none."""
    src = Path(cache) / chain
    try:
        entry = json.loads((src / ENTRY).read_text())
    except (OSError, ValueError):
        return None
    if entry.get("chain_hash") != chain:
        return None
    try:
        for rel in entry.get("files", []):
            target = Path(run_dir) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}")
            shutil.copy2(src / "files" / rel, tmp)
            os.replace(tmp, target)
    except OSError:
        return None
    entry["cache_dir"] = str(src)
    return entry


CLAIM_POLL_S = 0.25


@dataclass(frozen=True)
class Claim:
    path: Path
    fd: int  # holds the flock (pipeline.rundir.try_lock)


def claim(cache: Path, chain: str, waiting: Callable[[str], None] | None = None) -> Claim | None:
    """Before computing a stage: take the cache's claim on it, or wait while another run holds one.

    Parallel runs that share a stage (a sweep's trials) would otherwise all compute it before any
    published it. Returns the claim to `release`, or None when the stage is in the cache (reuse
    it). The claim is the run directory's kind of lock (an flock the kernel drops when its holder
    dies), so a crashed run's claim is simply taken over; `waiting(owner)` is called once when this
    run has to wait.
    """
    path = Path(cache) / f".{chain}.claim"
    told = False
    Path(cache).mkdir(parents=True, exist_ok=True)
    while True:
        if (Path(cache) / chain / ENTRY).is_file():
            return None
        fd = try_lock(path)
        if fd is not None:
            if not (Path(cache) / chain / ENTRY).is_file():
                return Claim(path, fd)
            unlock(path, fd)  # published between the check and the lock
            return None
        if waiting is not None and not told:
            pid = read_pid(path)
            waiting(f"pid {pid}" if pid else "another run")
            told = True
        time.sleep(CLAIM_POLL_S)


def release(claimed: Claim | None) -> None:
    """Give up a claim (the stage is published, failed or interrupted)."""
    if claimed is not None:
        unlock(claimed.path, claimed.fd)
