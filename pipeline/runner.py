"""Run a recipe's stages in order inside a run directory, with a manifest that makes runs resumable.

The runner knows nothing about what a stage does. It builds the context (model, data, example
input), calls each stage, records metrics, artifacts (with sha256) and gates in `manifest.json`
after every stage (atomically), and writes the reports at the end, also when a gate failed.

Resume: stage i is skipped when the manifest holds a finished stage i with the same chain hash
(hash of the model/data/seed and of every stage config up to i) and all its artifacts still exist
with the recorded sha256. Once one stage re-runs, every later stage re-runs too.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import errno
import json
import os
import platform
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

import pipeline
from pipeline import atomic, stagecache
from pipeline.errors import (EXIT_GATE_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_STAGE_FAILED, BadInput, FmapError,
                             StageFailed)
from pipeline.fingerprint import chain_hash, input_hash, sha256_file
from pipeline.recipe import Recipe, StageSpec, dump_lock
from pipeline.runlog import capture_third_party
from pipeline.rundir import RunDirLock, SpaceReserve, remove_orphans, remove_stale_reports
from pipeline.stages import get_stage
from pipeline.stages.base import Artifact, GateResult, StageContext, StageResult

MANIFEST = "manifest.json"
LOCK = "recipe.lock.yaml"
RUN_LOG = "run.log"
# Libraries every run depends on; each backend adds its own (Backend.libraries) to the environment.
CORE_LIBRARIES = ("torch", "torchvision", "torch-pruning", "onnx", "onnxslim", "numpy")


@dataclass
class RunOutcome:
    run_dir: Path
    exit_code: int
    manifest: dict[str, Any]
    failed_gates: list[dict[str, Any]]
    error: str | None = None


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def environment(threads: int) -> dict[str, Any]:
    """Library versions and machine facts, so a report says what produced its numbers."""
    from importlib import metadata

    from pipeline.backends.base import BACKENDS
    from pipeline.verify.machine import cpu_info
    from pipeline.verify.threads import thread_env

    libs = {}
    backend_libs = [lib for _, b in BACKENDS.items() for lib in b.libraries]
    for dist in dict.fromkeys([*CORE_LIBRARIES, *backend_libs]):
        try:
            libs[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            libs[dist] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_flags": cpu_info()["cpu_flags"],
        "cpu_count": os.cpu_count(),
        "thread_env": thread_env(),
        "threads": threads,
        "libraries": libs,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Runner:
    def __init__(self, recipe: Recipe, run_dir: Path, console: Console, resume: bool = False,
                 stage_cache: Path | None = None) -> None:
        self.recipe = recipe
        self.run_dir = run_dir
        self.console = console
        self.resume = resume
        self.stage_cache = stage_cache  # pipeline.stagecache: stages shared with other runs
        self.manifest: dict[str, Any] = {}

    # -- setup ---------------------------------------------------------------------------
    def build_context(self) -> StageContext:
        import torch

        from pipeline.preflight import check_stage_settings
        from pipeline.sources.checks import check_finite_weights, check_split, output_classes
        from pipeline.sources.data import build_bundle
        from pipeline.sources.capabilities import check_stages
        from pipeline.sources.models import build_model, default_input_shape

        torch.manual_seed(self.recipe.seed)
        torch.set_num_threads(self.recipe.threads)
        log = lambda msg: self.console.print(f"[dim]{msg}[/]")  # noqa: E731
        base_dir = self.recipe.source_path.parent if self.recipe.source_path else None
        model = build_model(self.recipe.model, log=log, base_dir=base_dir)
        check_finite_weights(model, self.recipe.model.weights or f"model '{self.recipe.model.source}'")
        input_shape = default_input_shape(self.recipe.model, base_dir)
        check_stages(self.recipe, model)
        check_stage_settings(self.recipe, model)
        data = build_bundle(self.recipe.data, input_shape, seed=self.recipe.seed)
        example = torch.randn(input_shape, generator=torch.Generator().manual_seed(self.recipe.seed))
        classes = output_classes(self._check_model_runs(model, example))
        for split in (data.calibration, data.eval, data.train):
            if split is not None:
                check_split(split, model, classes)
        return StageContext(run_dir=self.run_dir, model=model, model_spec=self.recipe.model,
                            original_model=copy.deepcopy(model).eval(), example_input=example, data=data,
                            console=self.console, threads=self.recipe.threads, seed=self.recipe.seed)

    def _check_model_runs(self, model: Any, example: Any) -> Any:
        import torch

        try:
            with torch.no_grad():
                return model(example)
        except Exception as exc:
            shape = list(example.shape)
            raise BadInput(f"model '{self.recipe.model.source}' fails on an input of shape {shape}: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]} (check model.input_shape)") from None

    def _load_previous(self) -> dict[str, dict[str, Any]]:
        path = self.run_dir / MANIFEST
        if not (self.resume and path.is_file()):
            return {}
        try:
            old = json.loads(path.read_text())
            return {s["id"]: s for s in old.get("stages", [])}
        except (OSError, ValueError, KeyError, TypeError):
            self.console.print("[yellow]warning[/] previous manifest.json is unreadable; running every stage")
            return {}

    def _write_manifest(self) -> None:
        atomic.write_json(self.run_dir / MANIFEST, self.manifest)

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> RunOutcome:
        """Lock the run directory, run every stage, and always leave a final manifest status."""
        lock = RunDirLock(self.run_dir).acquire()  # BadInput (exit 2) when another run holds it
        try:
            with sigterm_as_interrupt():
                return self._run_locked()
        finally:
            lock.release()

    def _run_locked(self) -> RunOutcome:
        previous = self._load_previous()
        self._clean_run_dir()
        self.reserve = SpaceReserve(self.run_dir)
        self.reserve.hold()
        try:
            return self._run_reserved(previous)
        finally:
            self.reserve.release()

    def _run_reserved(self, previous: dict[str, dict[str, Any]]) -> RunOutcome:
        self.manifest = {
            "fmap_version": pipeline.__version__,
            "recipe_name": self.recipe.name,
            "recipe_path": str(self.recipe.source_path) if self.recipe.source_path else None,
            "run_dir": str(self.run_dir),
            "started": now(),
            "finished": None,
            "status": "running",
            "exit_code": None,
            "pid": os.getpid(),
            "environment": environment(self.recipe.threads),
            "stages": [self._pending_entry(s) for s in self.recipe.stages],
        }
        exit_code, error = EXIT_OK, None
        try:
            atomic.write_text(self.run_dir / LOCK, dump_lock(self.recipe))
            self._write_manifest()
            with capture_third_party(self.run_dir / RUN_LOG):  # library prints/logs -> run.log, not the console
                ctx = self.build_context()
                self._run_stages(ctx, previous)
        except KeyboardInterrupt:
            exit_code, error = EXIT_INTERRUPTED, "interrupted"
            self.manifest["status"] = "interrupted"
        except FmapError as exc:
            exit_code, error = exc.exit_code, str(exc)
            self.manifest["status"] = "failed"
        except (Exception, SystemExit) as exc:  # internal error or disk full: never leave "running" behind
            exit_code, error = EXIT_STAGE_FAILED, self._internal_error(exc)
            self.manifest["status"] = "failed"
        failed = [g for s in self.manifest["stages"] for g in s.get("gates", []) if not g["passed"]]
        if exit_code == EXIT_OK:
            exit_code = EXIT_GATE_FAILED if failed else EXIT_OK
            self.manifest["status"] = "gate_failed" if failed else "ok"
        started = any(st["status"] != "pending" for st in self.manifest["stages"])
        # nothing to report when the inputs never loaded; an interrupted run is reported by --resume
        finish_error = self._finish(exit_code, error, reports=started and exit_code != EXIT_INTERRUPTED)
        if finish_error is not None:
            exit_code, error = EXIT_STAGE_FAILED, finish_error
            self.manifest["status"] = "failed"
            self._finish(exit_code, error, reports=False)
        return RunOutcome(self.run_dir, exit_code, self.manifest, failed, error)

    def _finish(self, exit_code: int, error: str | None, reports: bool = True) -> str | None:
        """Write the final manifest (then the reports); returns an error message or None."""
        self.manifest["finished"] = now()
        self.manifest["exit_code"] = exit_code
        self.manifest["error"] = error
        try:
            self._write_manifest()
        except OSError as exc:
            msg = _os_error_message(exc, self.run_dir / MANIFEST)
            if exc.errno == errno.ENOSPC and self.reserve.held:
                self.reserve.release()  # the room held back for exactly this write
                self.manifest.update(status="failed", exit_code=EXIT_STAGE_FAILED, error=error or msg)
                try:
                    self._write_manifest()
                except OSError:
                    pass
            return msg
        if error and error.startswith("no space left on device"):
            return None  # the disk is full: reports cannot be written either; the manifest says why
        return self._write_reports() if reports else None

    def _clean_run_dir(self) -> None:
        """Orphans of a killed run and the reports of an earlier run go before anything is written."""
        removed = remove_orphans(self.run_dir)
        if removed:
            self.console.print(f"[dim]removed {len(removed)} temp file(s) left by an interrupted run[/]")
        remove_stale_reports(self.run_dir)

    def _internal_error(self, exc: BaseException) -> str:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return _os_error_message(exc, self.run_dir)
        try:
            atomic.write_text(self.run_dir / "error.log", traceback.format_exc())
            where = f" (traceback in {self.run_dir / 'error.log'})"
        except OSError:
            where = ""
        if isinstance(exc, SystemExit):
            return f"internal error: code called sys.exit({exc.code!r}){where}"
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return f"internal error: {type(exc).__name__}: {first}{where}"

    def _pending_entry(self, spec: StageSpec) -> dict[str, Any]:
        return {"id": spec.id, "kind": spec.kind, "status": "pending", "skip_reason": None, "resumed": False,
                "reused": None, "started": None, "duration_s": None, "config": spec.config.model_dump(mode="json", by_alias=True),
                "chain_hash": None, "metrics": {}, "artifacts": {}, "gates": [], "error": None}

    def _run_stages(self, ctx: StageContext, previous: dict[str, dict[str, Any]]) -> None:
        chain = input_hash(self.recipe)
        can_resume = bool(previous)
        total = len(self.recipe.stages)
        for n, spec in enumerate(self.recipe.stages, start=1):
            chain = chain_hash(chain, spec)
            entry = self.manifest["stages"][spec.index]
            entry["chain_hash"] = chain
            stage = get_stage(spec.kind)()
            old = previous.get(spec.id)
            if can_resume and old is not None and self._reusable(old, chain):
                result = _result_from_entry(old, self.run_dir)
                stage.restore(ctx, spec.config, result)
                self._record(ctx, spec, entry, result, old.get("duration_s") or 0.0, old.get("started"))
                entry["resumed"] = True
                entry["reused"] = old.get("reused")  # still another run's work, if it was
                self.console.print(f"[bold]\\[{n}/{total}] {spec.id}[/] [dim]unchanged, resumed from the previous run[/]")
                continue
            can_resume = False
            with self._claimed(spec, chain):  # a run computing this very stage for the cache: wait, then reuse it
                if self.stage_cache is not None and self._reuse_cached(ctx, spec, stage, entry, chain):
                    self.console.print(f"[bold]\\[{n}/{total}] {spec.id}[/] [dim]reused from {entry['reused']['run_dir']}[/]")
                    continue
                self._compute(ctx, spec, stage, entry, chain, f"[{n}/{total}] {spec.id}")

    @contextlib.contextmanager
    def _claimed(self, spec: StageSpec, chain: str) -> Iterator[None]:
        """Hold the stage cache's claim on `chain` while reusing or computing it (pipeline.stagecache):
        parallel runs sharing a stage compute it once."""
        if self.stage_cache is None:
            yield
            return
        try:
            claim = stagecache.claim(self.stage_cache, chain, lambda owner: self.console.print(
                f"[dim]{spec.id}: waiting for {owner}, which is computing this very stage[/]"))
        except OSError as exc:  # an unwritable cache shares nothing, it does not fail the run
            self.console.print(f"[yellow]warning[/] stage cache {self.stage_cache}: {exc.strerror or exc}")
            claim = None
        try:
            yield
        finally:
            stagecache.release(claim)

    def _compute(self, ctx: StageContext, spec: StageSpec, stage: Any, entry: dict[str, Any], chain: str,
                 title: str) -> None:
        """Run one stage, record it, offer it to the stage cache."""
        before = stagecache.snapshot(self.run_dir) if self.stage_cache is not None else {}
        self.console.rule(f"[bold]{title}[/]", style="dim")
        entry["status"] = "running"
        entry["started"] = now()
        self._write_manifest()
        t0 = time.perf_counter()
        try:
            result = stage.run(ctx, spec.config)
        except KeyboardInterrupt:
            entry.update(status="interrupted", duration_s=round(time.perf_counter() - t0, 3))
            raise
        except FmapError as exc:
            entry.update(status="failed", error=str(exc), duration_s=round(time.perf_counter() - t0, 3))
            raise
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise StageFailed(self._stage_crash(spec, exc, entry, t0)) from exc
            msg = _os_error_message(exc, self.run_dir)
            entry.update(status="failed", error=msg, duration_s=round(time.perf_counter() - t0, 3))
            raise StageFailed(msg) from exc
        except (Exception, SystemExit) as exc:  # a bug or a library failure: traceback in the run dir
            raise StageFailed(self._stage_crash(spec, exc, entry, t0)) from exc
        missing = [a for a in stage.produces(spec.config) if a not in result.artifacts]
        if result.status == "ok" and missing:  # a broken contract, not bad input
            msg = f"stage '{spec.id}' declares the artifact '{missing[0]}' but did not produce it"
            entry.update(status="failed", error=msg, duration_s=round(time.perf_counter() - t0, 3))
            raise StageFailed(msg)
        self._record(ctx, spec, entry, result, time.perf_counter() - t0, entry["started"])
        self._publish(entry, chain, before)
        if result.status == "skipped":
            self.console.print(f"[yellow]skipped[/] {spec.id}: {escape(str(result.skip_reason))}")
        else:
            self.console.print(f"[green]done[/] {spec.id} in {entry['duration_s']:.1f} s")

    def _stage_crash(self, spec: StageSpec, exc: BaseException, entry: dict[str, Any], t0: float) -> str:
        """Save the traceback, mark the stage failed, return the one-line message."""
        try:
            atomic.write_text(self.run_dir / "error.log", traceback.format_exc())
        except OSError:
            pass
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        if isinstance(exc, SystemExit):
            first = f"code called sys.exit({exc.code!r})"
        msg = f"stage '{spec.id}' failed: {type(exc).__name__}: {first} (traceback in {self.run_dir / 'error.log'})"
        entry.update(status="failed", error=msg, duration_s=round(time.perf_counter() - t0, 3))
        return msg

    def _reuse_cached(self, ctx: StageContext, spec: StageSpec, stage: Any, entry: dict[str, Any], chain: str) -> bool:
        """Restore a stage another run finished with the same chain hash (pipeline.stagecache)."""
        assert self.stage_cache is not None
        cached = stagecache.fetch(self.stage_cache, chain, self.run_dir)
        if cached is None or not self._reusable(cached, chain):
            return False
        result = _result_from_entry(cached, self.run_dir)
        stage.restore(ctx, spec.config, result)
        self._record(ctx, spec, entry, result, cached.get("duration_s") or 0.0, cached.get("started"))
        entry["reused"] = {"chain_hash": chain, "run_dir": cached.get("run_dir"), "cache": cached["cache_dir"]}
        self._write_manifest()
        return True

    def _publish(self, entry: dict[str, Any], chain: str, before: dict[str, tuple[int, int]]) -> None:
        """Offer a finished stage to the stage cache; a cache that cannot be written only warns."""
        if self.stage_cache is None or entry["status"] not in ("ok", "skipped"):
            return
        try:
            stagecache.publish(self.stage_cache, chain, entry, self.run_dir,
                               stagecache.written_since(before, self.run_dir))
        except OSError as exc:
            self.console.print(f"[yellow]warning[/] stage cache {self.stage_cache}: {exc.strerror or exc}")

    def _reusable(self, old: dict[str, Any], chain: str) -> bool:
        if old.get("chain_hash") != chain or old.get("status") not in ("ok", "skipped"):
            return False
        for art in old.get("artifacts", {}).values():
            path = self.run_dir / art["path"] if not Path(art["path"]).is_absolute() else Path(art["path"])
            if not path.is_file() or (art.get("sha256") and sha256_file(path) != art["sha256"]):
                return False
        return True

    def _record(self, ctx: StageContext, spec: StageSpec, entry: dict[str, Any], result: StageResult,
                duration: float, started: str | None) -> None:
        """The one place a run's artifacts are recorded: the manifest and `ctx.artifacts`."""
        ctx.results[spec.id] = result
        artifacts = {}
        for name, art in result.artifacts.items():
            ctx.artifacts[name] = art
            info = art.to_dict(self.run_dir)
            if art.path.is_file():
                info["sha256"] = sha256_file(art.path)
                info["size_bytes"] = art.path.stat().st_size
            artifacts[name] = info
        entry.update(status=result.status, skip_reason=result.skip_reason, started=started,
                     duration_s=round(duration, 3), metrics=_jsonable(result.metrics), artifacts=artifacts,
                     gates=[g.to_dict() for g in result.gates])
        self._write_manifest()

    def _remove_reports(self) -> None:
        from pipeline.report import report_filenames

        for name in report_filenames():
            (self.run_dir / name).unlink(missing_ok=True)

    def _write_reports(self) -> str | None:
        """Write every report; a failure is returned as the run's error (exit 3: CI must not pass
        on a run whose junit.xml or report.md is missing)."""
        from pipeline.report import write_reports

        try:
            written = write_reports(self.run_dir)
        except OSError as exc:
            self._remove_reports()  # a partial set would describe the run as it was before it failed
            return _os_error_message(exc, self.run_dir)
        except Exception as exc:
            self._remove_reports()
            try:
                atomic.write_text(self.run_dir / "report-error.log", traceback.format_exc())
            except OSError:
                pass
            return f"report generation failed: {type(exc).__name__}: {exc} (traceback in report-error.log)"
        for fmt, path in written.items():
            self.console.print(f"[dim]wrote {fmt} report: {path}[/]")
        return None


def _os_error_message(exc: OSError, default: Path) -> str:
    """One line for an OSError; disk full names the file being written."""
    if exc.errno == errno.ENOSPC:
        if isinstance(exc, atomic.DiskFull):
            return str(exc.strerror)
        return f"no space left on device while writing {exc.filename or default}"
    return f"{type(exc).__name__}: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (CI cancelling a job, `kill`) ends the run like Ctrl-C: manifest 'interrupted'."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=atomic._json_default))


def _result_from_entry(entry: dict[str, Any], run_dir: Path) -> StageResult:
    artifacts = {}
    for name, art in entry.get("artifacts", {}).items():
        p = Path(art["path"])
        artifacts[name] = Artifact(path=p if p.is_absolute() else run_dir / p, kind=art["kind"],
                                   precision=art.get("precision"), description=art.get("description", ""))
    gates = [GateResult(**{k: g.get(k) for k in ("name", "threshold", "value", "passed", "artifact", "detail")})
             for g in entry.get("gates", [])]
    return StageResult(metrics=entry.get("metrics", {}), artifacts=artifacts, gates=gates,
                       status=entry.get("status", "ok"), skip_reason=entry.get("skip_reason"))


def run_recipe(recipe: Recipe, out: str | Path | None = None, resume: bool = False,
               console: Console | None = None, stage_cache: Path | None = None) -> RunOutcome:
    console = console or Console(stderr=True)
    return Runner(recipe, recipe.run_dir(out), console, resume=resume, stage_cache=stage_cache).run()
