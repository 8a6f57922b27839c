"""Run a recipe's stages in order inside a run directory, with a manifest that makes runs resumable.

The runner knows nothing about what a stage does. It builds the context (model, data, example
input), calls each stage, records metrics, artifacts (with sha256) and gates in `manifest.json`
after every stage (atomically), and writes the reports at the end, also when a gate failed.

Resume: stage i is skipped when the manifest holds a finished stage i with the same chain hash
(hash of the model/data/seed and of every stage config up to i) and all its artifacts still exist
with the recorded sha256. Once one stage re-runs, every later stage re-runs too.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import platform
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

import pipeline
from pipeline import atomic
from pipeline.errors import (EXIT_GATE_FAILED, EXIT_INTERRUPTED, EXIT_OK, BadInput, FmapError, StageFailed)
from pipeline.recipe import Recipe, StageSpec, dump_lock
from pipeline.runlog import capture_third_party
from pipeline.stages import get_stage
from pipeline.stages.base import Artifact, GateResult, StageContext, StageResult

MANIFEST = "manifest.json"
LOCK = "recipe.lock.yaml"
RUN_LOG = "run.log"


@dataclass
class RunOutcome:
    run_dir: Path
    exit_code: int
    manifest: dict[str, Any]
    failed_gates: list[dict[str, Any]]
    error: str | None = None


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def environment(threads: int) -> dict[str, Any]:
    """Library versions and machine facts, so a report says what produced its numbers."""
    from importlib import metadata

    libs = {}
    for dist in ("torch", "torchvision", "torch-pruning", "onnx", "onnxruntime", "openvino", "onnxslim", "numpy",
                 "tensorrt"):
        try:
            libs[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            libs[dist] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
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


def _input_hash(recipe: Recipe) -> str:
    material = recipe.hash_material() + pipeline.__version__
    weights = recipe.model.weights
    if weights and Path(weights).is_file():
        material += sha256_file(Path(weights))
    return hashlib.sha256(material.encode()).hexdigest()


def _chain_hash(previous: str, spec: StageSpec) -> str:
    cfg = json.dumps(spec.to_dict(), sort_keys=True)
    return hashlib.sha256(f"{previous}|{spec.id}|{cfg}".encode()).hexdigest()


class Runner:
    def __init__(self, recipe: Recipe, run_dir: Path, console: Console, resume: bool = False) -> None:
        self.recipe = recipe
        self.run_dir = run_dir
        self.console = console
        self.resume = resume
        self.manifest: dict[str, Any] = {}

    # -- setup ---------------------------------------------------------------------------
    def build_context(self) -> StageContext:
        import torch

        from pipeline.sources.data import build_bundle
        from pipeline.sources.capabilities import check_stages
        from pipeline.sources.models import build_model, default_input_shape

        torch.manual_seed(self.recipe.seed)
        torch.set_num_threads(self.recipe.threads)
        log = lambda msg: self.console.print(f"[dim]{msg}[/]")  # noqa: E731
        base_dir = self.recipe.source_path.parent if self.recipe.source_path else None
        model = build_model(self.recipe.model, log=log, base_dir=base_dir)
        input_shape = default_input_shape(self.recipe.model, base_dir)
        check_stages(self.recipe, model)
        data = build_bundle(self.recipe.data, input_shape, seed=self.recipe.seed)
        example = torch.randn(input_shape, generator=torch.Generator().manual_seed(self.recipe.seed))
        self._check_model_runs(model, example)
        return StageContext(recipe=self.recipe, run_dir=self.run_dir, model=model,
                            original_model=copy.deepcopy(model).eval(), example_input=example, data=data,
                            console=self.console, threads=self.recipe.threads, seed=self.recipe.seed)

    def _check_model_runs(self, model: Any, example: Any) -> None:
        import torch

        try:
            with torch.no_grad():
                model(example)
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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("error.log", "report-error.log"):  # from an earlier run of this directory
            (self.run_dir / stale).unlink(missing_ok=True)
        previous = self._load_previous()
        atomic.write_text(self.run_dir / LOCK, dump_lock(self.recipe))
        self.manifest = {
            "fmap_version": pipeline.__version__,
            "recipe_name": self.recipe.name,
            "recipe_path": str(self.recipe.source_path) if self.recipe.source_path else None,
            "run_dir": str(self.run_dir),
            "started": now(),
            "finished": None,
            "status": "running",
            "exit_code": None,
            "environment": environment(self.recipe.threads),
            "stages": [self._pending_entry(s) for s in self.recipe.stages],
        }
        self._write_manifest()
        exit_code, error = EXIT_OK, None
        try:
            with capture_third_party(self.run_dir / RUN_LOG):  # library prints/logs -> run.log, not the console
                ctx = self.build_context()
                self._run_stages(ctx, previous)
        except KeyboardInterrupt:
            exit_code, error = EXIT_INTERRUPTED, "interrupted"
            self.manifest["status"] = "interrupted"
        except FmapError as exc:
            exit_code, error = exc.exit_code, str(exc)
            self.manifest["status"] = "failed"
        failed = [g for s in self.manifest["stages"] for g in s.get("gates", []) if not g["passed"]]
        if exit_code == EXIT_OK:
            exit_code = EXIT_GATE_FAILED if failed else EXIT_OK
            self.manifest["status"] = "gate_failed" if failed else "ok"
        self.manifest["finished"] = now()
        self.manifest["exit_code"] = exit_code
        self.manifest["error"] = error
        self._write_manifest()
        started = any(st["status"] != "pending" for st in self.manifest["stages"])
        if exit_code != EXIT_INTERRUPTED and started:  # nothing to report when the inputs never loaded
            self._write_reports()
        return RunOutcome(self.run_dir, exit_code, self.manifest, failed, error)

    def _pending_entry(self, spec: StageSpec) -> dict[str, Any]:
        return {"id": spec.id, "kind": spec.kind, "status": "pending", "skip_reason": None, "resumed": False,
                "started": None, "duration_s": None, "config": spec.config.model_dump(mode="json", by_alias=True),
                "chain_hash": None, "metrics": {}, "artifacts": {}, "gates": [], "error": None}

    def _run_stages(self, ctx: StageContext, previous: dict[str, dict[str, Any]]) -> None:
        chain = _input_hash(self.recipe)
        can_resume = bool(previous)
        total = len(self.recipe.stages)
        for n, spec in enumerate(self.recipe.stages, start=1):
            chain = _chain_hash(chain, spec)
            entry = self.manifest["stages"][spec.index]
            entry["chain_hash"] = chain
            stage = get_stage(spec.kind)()
            old = previous.get(spec.id)
            if can_resume and old is not None and self._reusable(old, chain):
                result = _result_from_entry(old, self.run_dir)
                stage.restore(ctx, spec.config, result)
                self._record(ctx, spec, entry, result, old.get("duration_s") or 0.0, old.get("started"))
                entry["resumed"] = True
                self.console.print(f"[bold]\\[{n}/{total}] {spec.id}[/] [dim]unchanged, resumed from the previous run[/]")
                continue
            can_resume = False
            self.console.rule(f"[bold][{n}/{total}] {spec.id}[/]", style="dim")
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
            except Exception as exc:  # a bug or a library failure: keep the traceback in the run dir
                atomic.write_text(self.run_dir / "error.log", traceback.format_exc())
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                msg = f"stage '{spec.id}' failed: {type(exc).__name__}: {first} (traceback in {self.run_dir / 'error.log'})"
                entry.update(status="failed", error=msg, duration_s=round(time.perf_counter() - t0, 3))
                raise StageFailed(msg) from exc
            self._record(ctx, spec, entry, result, time.perf_counter() - t0, entry["started"])
            if result.status == "skipped":
                self.console.print(f"[yellow]skipped[/] {spec.id}: {escape(str(result.skip_reason))}")
            else:
                self.console.print(f"[green]done[/] {spec.id} in {entry['duration_s']:.1f} s")

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

    def _write_reports(self) -> None:
        try:
            from pipeline.report import write_reports
        except ImportError:
            self.console.print("[yellow]warning[/] reports unavailable (pipeline.report missing)")
            return
        try:
            written = write_reports(self.run_dir)
        except Exception as exc:  # reports must never turn a finished run into a crash
            atomic.write_text(self.run_dir / "report-error.log", traceback.format_exc())
            self.console.print(f"[red]report generation failed[/]: {type(exc).__name__}: {exc}")
            return
        for fmt, path in written.items():
            self.console.print(f"[dim]wrote {fmt} report: {path}[/]")


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
               console: Console | None = None) -> RunOutcome:
    console = console or Console(stderr=True)
    return Runner(recipe, recipe.run_dir(out), console, resume=resume).run()
