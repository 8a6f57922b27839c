"""Verify: run the original, the current model and every model artifact on every requested backend;
measure accuracy/agreement, interleaved latency with confidence intervals and memory; check gates.

Nothing is faked: an artifact/backend pair that cannot run is listed in metrics["unavailable"]
with its reason, and a gate on something unmeasured fails.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from pipeline.backends import available, get_backend, loads, registered_names
from pipeline.backends.base import BackendUnavailable
from pipeline.backends.torch import torch_threads
from pipeline.errors import BadInput, StageFailed
from pipeline.plugins import loaded_plugins
from pipeline.quiet import quiet_machine, runnable_now
from pipeline.contracts import run_relative
from pipeline.stages.base import Stage, StageConfig, StageContext, StageResult
from pipeline.verify.accuracy import AccuracyAccumulator
from pipeline.verify.gates import GatesConfig, evaluate_gates, gate_targets
from pipeline.verify.latency import RssProbe, measure, speedup_ci, summarize
from pipeline.verify.machine import conditions, cpu_info, load_average
from pipeline.verify.threads import thread_env
from pipeline.visualize.compare import same_weights


class LatencyConfig(StageConfig):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1)
    warmup: int = Field(default=10, ge=0, le=100_000)
    iterations: int = Field(default=50, ge=5, le=1_000_000)
    threads: int | None = Field(default=None, gt=0)  # None: the run's thread count (ctx.threads)
    interleave: bool = True
    isolate: bool = False  # time each artifact x backend in its own process (no interleaving, unpaired CIs)

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b <= 0 or b > 4096 for b in v):
            raise ValueError("batch sizes must be between 1 and 4096")
        return list(dict.fromkeys(v))


class VerifyConfig(StageConfig):
    backends: list[str] = Field(default_factory=lambda: ["torch", "onnxruntime"], min_length=1)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    baseline: Literal["original"] = "original"
    eval_samples: int | None = Field(default=None, gt=0)  # cap on eval samples (None: the whole split)

    @field_validator("backends")
    @classmethod
    def _registered(cls, v: list[str]) -> list[str]:
        """Any registered backend (built-in or plug-in) is accepted; the message names them."""
        return registered_names(v)


@dataclass
class _Candidate:
    name: str
    kind: str
    precision: str | None
    source: Any  # nn.Module or Path
    path: str | None
    size_bytes: int | None
    size_method: str


@dataclass
class _Run:
    cand: _Candidate
    backend: str
    session: Any
    memory: dict[str, Any]
    description: dict[str, Any]
    batch_one_only: bool = False


class VerifyStage(Stage[VerifyConfig]):
    name = "verify"
    Config = VerifyConfig
    description = "accuracy, agreement, interleaved latency with CIs, memory and gates per artifact x backend"

    def run(self, ctx: StageContext, cfg: VerifyConfig) -> StageResult:
        threads = cfg.latency.threads or ctx.threads
        # sessions set torch's thread count only inside their calls; holding it at `threads` for the
        # stage keeps timing loops from switching it back and forth, and restores it on the way out
        with torch_threads(threads):
            return self._verify(ctx, cfg, threads)

    def _verify(self, ctx: StageContext, cfg: VerifyConfig, threads: int) -> StageResult:
        split = ctx.data.eval or ctx.data.calibration
        if (cfg.gates.max_accuracy_drop is not None) and (split is None or not split.has_labels):
            raise BadInput("verify.gates.max_accuracy_drop needs labelled data.eval in the recipe "
                           "(use gates.min_agreement for unlabelled data)")
        unavailable, usable = _probe_backends(cfg)
        cands = _candidates(ctx)
        with contextlib.ExitStack() as sessions:  # every loaded session closes, last opened first
            runs = _load_all(ctx, cfg, cands, usable, threads, _batch(ctx, split, 1), unavailable, sessions)
            base = next(r for r in runs if r.cand.name == cfg.baseline and r.backend == "torch")
            with ctx.console.status(f"verify: accuracy and agreement, {len(runs)} sessions on "
                                    f"{len(split) if split is not None else 1} samples"):
                accuracy, noise_floor = _accuracy(ctx, cfg, split, base, runs)
            _warn_gate_below_floor(ctx, cfg, noise_floor)
            with quiet_machine() as paused:  # in a parallel sweep: the other trials wait while this one times
                latency, speedup, speedup_fp32, speedup_vs, machine = _latency(ctx, cfg, split, base, runs, paused)
        results = [_result_row(r, cfg, accuracy, latency, speedup, speedup_fp32, speedup_vs) for r in runs]
        deployable = _deployable(ctx, cands)
        targets = gate_targets(cfg.gates, deployable, [r["artifact"] for r in results], cfg.baseline)
        gates = evaluate_gates(cfg.gates, results, targets, cfg.baseline, batch_size=cfg.latency.batch_sizes[0],
                               unmeasured=_not_run(cfg, cands, unavailable))
        metrics = {
            "baseline": cfg.baseline, "deployable": deployable, "gate_targets": targets,
            "gate_batch_size": cfg.latency.batch_sizes[0], "threads": threads,
            "eval": {"split": getattr(split, "name", None), "samples": accuracy[(cfg.baseline, "torch")]["samples"],
                     "has_labels": bool(split is not None and split.has_labels)},
            "noise_floor": noise_floor,
            "latency_config": cfg.latency.model_dump(), "machine": machine, "thread_env": thread_env(),
            "results": results, "unavailable": unavailable,
        }
        for u in unavailable:
            ctx.console.print(f"[yellow]verify: {u['artifact'] or 'all artifacts'} on {u['backend'] or '-'} "
                              f"not measured: {u['reason']}[/yellow]")
        return StageResult(metrics=metrics, gates=gates)


def _probe_backends(cfg: VerifyConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """(backends that cannot run here, with reasons; those that can). torch always: the baseline."""
    unavailable: list[dict[str, Any]] = []
    usable: list[str] = []
    for b in dict.fromkeys(["torch", *cfg.backends]):
        reason = available(b)
        if reason:
            unavailable.append({"artifact": None, "backend": b, "reason": reason})
        elif b in cfg.backends or b == "torch":
            usable.append(b)
    return unavailable, usable


def _load_all(ctx: StageContext, cfg: VerifyConfig, cands: list[_Candidate], usable: list[str], threads: int,
              example: np.ndarray, unavailable: list[dict[str, Any]], sessions: contextlib.ExitStack) -> list[_Run]:
    """Load every candidate on every requested backend that loads its kind; `sessions` closes them."""
    runs: list[_Run] = []
    for cand in cands:
        backends = ["torch"] if cand.name == cfg.baseline else [b for b in cfg.backends if cand.kind in loads(b)]
        if not backends:
            unavailable.append({"artifact": cand.name, "backend": None, "reason":
                                f"no requested backend loads {cand.kind} artifacts "
                                f"(requested: {', '.join(cfg.backends)})"})
        for b in backends:
            if b not in usable:
                if not any(u["backend"] == b and u["artifact"] is None for u in unavailable):
                    unavailable.append({"artifact": cand.name, "backend": b, "reason": "backend unavailable"})
                continue
            run = _load(cand, b, threads, example, unavailable, ctx.original_model)
            if run is not None:
                sessions.enter_context(run.session)
                runs.append(run)
                ctx.console.print(f"verify: loaded {cand.name} on {b}")
    return runs


Measured = dict[tuple[str, str], dict[str, Any]]  # by (artifact, backend)


def _result_row(r: _Run, cfg: VerifyConfig, accuracy: Measured, latency: Measured, speedup: Measured,
                speedup_fp32: Measured, speedup_vs: Measured) -> dict[str, Any]:
    key = (r.cand.name, r.backend)
    return {
        "artifact": r.cand.name, "backend": r.backend, "kind": r.cand.kind,
        "precision": r.cand.precision, "path": r.cand.path, "size_bytes": r.cand.size_bytes,
        "size_method": r.cand.size_method, "accuracy": accuracy[key], "latency": latency[key],
        "speedup": speedup[key], "speedup_fp32": speedup_fp32[key], "speedup_vs": speedup_vs[key],
        "memory": r.memory, "session": r.description,
        "baseline": r.cand.name == cfg.baseline and r.backend == "torch",
    }


def _not_run(cfg: VerifyConfig, cands: list[_Candidate], unavailable: list[dict[str, Any]]) -> dict[str, str]:
    """Artifact -> why it was not measured (gates on it fail as unmeasured, with this reason)."""
    not_run = {u["artifact"]: u["reason"] for u in unavailable if u["artifact"]}
    for u in unavailable:
        if u["artifact"] is None:
            for c in cands:
                if u["backend"] in cfg.backends and c.kind in loads(u["backend"]):
                    not_run.setdefault(c.name, f"{u['backend']}: {u['reason']}")
    return not_run


def _candidates(ctx: StageContext) -> list[_Candidate]:
    """original, the current model if it differs (pruned), then every model artifact in run order."""
    out = [_Candidate("original", "torch", "fp32", ctx.original_model, None,
                      _state_bytes(ctx.original_model), "state_dict")]
    torch_arts = [(n, a) for n, a in ctx.model_artifacts().items() if a.kind == "torch"]
    current_differs = ctx.model is not ctx.original_model and not same_weights(ctx.model, ctx.original_model)
    if current_differs:
        if torch_arts:  # the last torch artifact is the checkpoint of the current model
            name, art = torch_arts.pop()
            out.append(_Candidate(name, "torch", art.precision or "fp32", ctx.model,
                                  run_relative(art.path, ctx.run_dir), _file_bytes(art.path), "file"))
        else:
            out.append(_Candidate("pruned", "torch", "fp32", ctx.model, None, _state_bytes(ctx.model), "state_dict"))
    done = {c.name for c in out}
    for name, art in ctx.model_artifacts().items():
        if name in done:
            continue
        out.append(_Candidate(name, art.kind, art.precision, art.path, run_relative(art.path, ctx.run_dir),
                              _file_bytes(art.path), "file"))
    return out


def _deployable(ctx: StageContext, cands: list[_Candidate]) -> str:
    """The last model artifact produced (the thing you would ship); else pruned/original."""
    return cands[-1].name


def _load(cand: _Candidate, backend: str, threads: int, example: np.ndarray,
          unavailable: list[dict[str, Any]], base_model: torch.nn.Module) -> _Run | None:
    module = get_backend(backend)
    try:
        with RssProbe() as probe:  # base_model: what a torch checkpoint applies to; others ignore it
            session = module.load(cand.source, threads=threads, precision_hint=cand.precision, base_model=base_model)
            session.infer(example)
    except BackendUnavailable as exc:
        unavailable.append({"artifact": cand.name, "backend": backend, "reason": str(exc)})
        return None
    except Exception as exc:  # visible in the report, and gates on it fail as unmeasured
        unavailable.append({"artifact": cand.name, "backend": backend,
                            "reason": f"failed to load/run: {type(exc).__name__}: {exc}"})
        return None
    return _Run(cand, backend, session, probe.to_dict(), _jsonable(_describe(session)))


def _infer(run: _Run, x: np.ndarray) -> np.ndarray:
    """Run a batch; static-batch artifacts (batch 1 only) get the batch sample by sample."""
    if not run.batch_one_only:
        try:
            return run.session.infer(x)
        except Exception:
            if len(x) == 1:
                raise
            run.batch_one_only = True
    return np.concatenate([run.session.infer(x[i:i + 1]) for i in range(len(x))])


def _accuracy(ctx: StageContext, cfg: VerifyConfig, split: Any, base: _Run,
              runs: list[_Run]) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, Any] | None]:
    """Every run's accuracy/agreement, and the original's agreement with itself under one grey level
    of input noise (pipeline/verify/noise_floor.py; None for inputs that are not image batches)."""
    from pipeline.verify.noise_floor import with_grey_noise

    accs = {(r.cand.name, r.backend): AccuracyAccumulator() for r in runs}
    floor, rng, images = AccuracyAccumulator(), np.random.default_rng(ctx.seed), split is not None
    errors: dict[tuple[str, str], str] = {}
    batches = split.take(cfg.eval_samples) if split is not None else [(torch.from_numpy(_batch(ctx, None, 1)), None)]
    for x, y in batches:
        xn = x.numpy().astype(np.float32)
        ref = _infer(base, xn)
        labels = None if y is None else y.numpy()
        for r in runs:
            key = (r.cand.name, r.backend)
            if key in errors:
                continue
            try:
                accs[key].update(ref if r is base else _infer(r, xn), ref, labels)
            except Exception as exc:
                errors[key] = f"{type(exc).__name__}: {exc}"
        noisy = with_grey_noise(xn, rng) if images else None
        images = noisy is not None
        if images:
            floor.update(_infer(base, noisy), ref, None)
    out = {}
    for key, acc in accs.items():
        res = acc.result()
        if key in errors:
            res["error"] = errors[key]
        res["split"] = getattr(split, "name", "example_input")
        out[key] = res
    if not images or not floor.samples:
        return out, None
    f = floor.result()
    return out, {k: f[k] for k in ("samples", "agreement", "agreement_confident", "confident_samples", "sqnr_db")}


def _warn_gate_below_floor(ctx: StageContext, cfg: VerifyConfig, floor: dict[str, Any] | None) -> None:
    """A min_agreement above the original's own agreement under invisible noise gates tie-breaking."""
    gate = cfg.gates.min_agreement
    if floor is None or gate is None or floor["agreement"] is None or floor["agreement"] >= gate:
        return
    ctx.console.print(f"[yellow]verify: gates.min_agreement {gate:g} is above the noise floor: the original itself "
                      f"agrees {floor['agreement']:.1%} with its own top-1 under one grey level of input noise on "
                      f"these {floor['samples']} samples (near-ties); agreement_confident and sqnr_db do not "
                      f"depend on them[/yellow]")


def _fp32_references(runs: list[_Run], base: _Run) -> dict[tuple[str, str], tuple[str, str]]:
    """For every run, the same runtime's FP32 artifact to compare against (what compression bought).

    torch: the original model. Other backends: the FP32 artifact of the same kind on that backend
    (onnx_fp32 for onnx_int8 on onnxruntime). A run that is itself the reference gets none.
    """
    refs: dict[tuple[str, str], tuple[str, str]] = {}
    base_key = (base.cand.name, base.backend)
    for r in runs:
        key = (r.cand.name, r.backend)
        if r.backend == "torch":
            ref = base_key
        else:
            ref = next(((o.cand.name, o.backend) for o in runs if o.backend == r.backend
                        and o.cand.kind == r.cand.kind and (o.cand.precision or "fp32") == "fp32"), None)
        if ref is not None and ref != key:
            refs[key] = ref
    return refs


def _latency(ctx: StageContext, cfg: VerifyConfig, split: Any, base: _Run, runs: list[_Run], paused: int | None):
    lc = cfg.latency
    latency: dict[tuple[str, str], dict[str, Any]] = {(r.cand.name, r.backend): {} for r in runs}
    speedup: dict[tuple[str, str], dict[str, Any]] = {(r.cand.name, r.backend): {} for r in runs}
    speedup_fp32: dict[tuple[str, str], dict[str, Any]] = {(r.cand.name, r.backend): {} for r in runs}
    speedup_vs: dict[tuple[str, str], dict[str, Any]] = {(r.cand.name, r.backend): {} for r in runs}
    refs = _fp32_references(runs, base)
    named = [] if cfg.gates.speedup_vs in ("original", "fp32") else [cfg.gates.speedup_vs]
    machine = {**cpu_info(), "conditions": {}}
    for bs in lc.batch_sizes:
        x = _batch(ctx, split, bs)
        runners = {}
        for r in runs:
            key = (r.cand.name, r.backend)
            try:
                if r.batch_one_only and bs > 1:
                    raise ValueError("artifact accepts batch size 1 only (static batch)")
                r.session.infer(x)
                runners[key] = (lambda s=r.session: s.infer(x))
            except Exception as exc:
                latency[key][str(bs)] = {"batch_size": bs, "error": f"{type(exc).__name__}: {exc}"[:300]}
        mode = " (each in its own process)" if lc.isolate else (" (interleaved)" if lc.interleave else "")
        ctx.console.print(f"verify: latency batch {bs}: {len(runners)} sessions x {lc.iterations} iterations{mode}")
        before, running = load_average(), runnable_now()
        if lc.isolate:
            times = _isolated_times(ctx, runs, runners, x, lc, lc.threads or ctx.threads, latency, bs)
        else:
            with ctx.console.status(f"verify: latency batch {bs}"):
                times = measure(runners, lc.warmup, lc.iterations, lc.interleave)  # type: ignore[arg-type]
        cond = conditions(before, load_average(), machine["cores"], paused, [running, runnable_now()])
        machine["conditions"][str(bs)] = cond
        if cond["busy"]:
            ctx.console.print(f"[yellow]warning: busy machine while timing batch {bs}: load average "
                              f"{cond['load_avg_1m_before']} → {cond['load_avg_1m_after']} on {cond['cores']} cores; "
                              "latencies and speedups are marked busy and may be biased[/yellow]")
        base_key = (base.cand.name, base.backend)

        paired = lc.interleave and not lc.isolate

        def ratio(ref: tuple[str, str], t: list[float]) -> dict[str, Any]:
            value, ci = speedup_ci(times[ref], t, paired=paired or times[ref] is t)  # itself: always paired
            return {"ratio": value, "ci95": list(ci), "paired": paired, "vs": f"{ref[0]}@{ref[1]}"}

        for key, t in times.items():
            latency[key][str(bs)] = {**summarize(t, bs), "load_avg_1m": [cond["load_avg_1m_before"],
                                                                         cond["load_avg_1m_after"]],
                                     "busy": cond["busy"]}
            if base_key in times:
                speedup[key][str(bs)] = ratio(base_key, t)
            if key in refs and refs[key] in times:
                speedup_fp32[key][str(bs)] = ratio(refs[key], t)
            for name in named:
                ref = (name, key[1])
                if ref in times and ref != key:
                    speedup_vs[key].setdefault(name, {})[str(bs)] = ratio(ref, t)
    machine["busy"] = any(c["busy"] for c in machine["conditions"].values())
    return latency, speedup, speedup_fp32, speedup_vs, machine


def _isolated_times(ctx: StageContext, runs: list[_Run], runners: dict[Any, Any], x: np.ndarray,
                    lc: LatencyConfig, threads: int, latency: dict[tuple[str, str], dict[str, Any]],
                    bs: int) -> dict[tuple[str, str], list[float]]:
    """Time each runnable artifact x backend in a fresh process, one after the other."""
    from pipeline.verify.isolated import time_in_subprocess

    times: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        key = (r.cand.name, r.backend)
        if key not in runners:
            continue
        spec: dict[str, Any] = {"backend": r.backend, "threads": threads, "warmup": lc.warmup,
                                "iterations": lc.iterations, "precision": r.cand.precision,
                                "plugins": loaded_plugins()}
        if r.backend == "torch":
            if ctx.model_spec is None:
                latency[key][str(bs)] = {"batch_size": bs, "error": "cannot be timed in its own process: "
                                         "the model was given as an object, not a model source"}
                continue
            spec["model"] = ctx.model_spec.model_dump(mode="json")
            if r.cand.name != "original":
                if not r.cand.path:
                    latency[key][str(bs)] = {"batch_size": bs, "error": "cannot be timed in its own process: "
                                             "the model has no checkpoint file"}
                    continue
                spec["checkpoint"] = str(ctx.run_dir / r.cand.path)
        else:
            spec["artifact"] = str(Path(r.cand.source))
        try:
            times[key] = time_in_subprocess(spec, x)
        except Exception as exc:  # visible per row; gates on it fail as unmeasured
            latency[key][str(bs)] = {"batch_size": bs, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return times


def _batch(ctx: StageContext, split: Any, bs: int) -> np.ndarray:
    """A real batch of `bs` inputs (repeated when the split is smaller); example input without data."""
    x = split.first_batch(bs)[0] if split is not None else ctx.example_input[:1]
    reps = -(-bs // len(x))
    return np.ascontiguousarray(torch.cat([x] * reps)[:bs].numpy().astype(np.float32))


def _state_bytes(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


def _file_bytes(p: Any) -> int | None:
    try:
        p = Path(p)
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        size = p.stat().st_size
        data = p.with_name(p.name + ".data")  # ONNX external data
        return size + (data.stat().st_size if data.exists() else 0)
    except OSError:
        return None


def _describe(session: Any) -> dict[str, Any]:
    try:
        return dict(session.describe())
    except Exception as exc:
        return {"error": f"describe() failed: {exc}"}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


__all__ = ["VerifyStage", "VerifyConfig", "LatencyConfig", "GatesConfig", "StageFailed"]
