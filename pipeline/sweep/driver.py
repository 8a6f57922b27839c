"""A sweep from start to end: validate everything, run the trials, collect the leaderboard.

Exact results (the default): every phase of a trial runs on its recipe's own `threads`, as a single
`fmap run` does, because results depend on the thread count (fine-tuning, INT8 calibration); at most
cores // threads phases run at once. `--no-exact`: cores // workers threads per worker while building.

Latency honesty: with more than one worker, trials run in two phases. The BUILD phase runs every
stage before the first `verify` in parallel; the TIMING phase then runs each trial's full recipe
with `--resume`, ONE trial at a time with the recipe's own thread count, so the runner restores the
built stages from their artifacts (same chain hash) and verify measures latency while no other
trial runs. With one worker there is one phase (shared stages still go through the stage cache).

Resume: a trial whose run directory holds a finished manifest (ok or gate_failed) and a
recipe.lock.yaml equal to the trial's resolved recipe is not run again; any other trial runs with
`--resume`, so its finished stages are reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from pipeline import atomic, stagecache
from pipeline.errors import EXIT_INTERRUPTED, BadInput
from pipeline.fingerprint import stage_chain
from pipeline.quiet import QuietServer
from pipeline.recipe import Recipe, dump_lock, load_recipe
from pipeline.sweep import grid as gridmod
from pipeline.sweep import objectives as objmod
from pipeline.sweep import prefixes
from pipeline.sweep.executors import Executor, LocalExecutor, TrialResult, TrialTask
from pipeline.sweep import search as searchmod
from pipeline.sweep.plan import SweepPlan, verify_index
from pipeline.sweep.search import OptunaSearch
from pipeline.sweep.report import recipe_text

FINISHED = ("ok", "gate_failed")
CACHE_DIR = "cache"  # the sweep's stage cache (pipeline.stagecache): shared prefixes


@dataclass
class SweepOutcome:
    out: Path
    exit_code: int
    data: dict[str, Any] = field(default_factory=dict)


def plan_sweep(recipe_path: Path, out: Path, grid_items: tuple[str, ...], overrides: tuple[str, ...] = (),
               objective_items: tuple[str, ...] = (), constraint_items: tuple[str, ...] = (),
               backend: str | None = None, workers: int | None = None, executor: str = "local",
               address: str | None = None, retry_failed: bool = False,
               build_threads: int | None = None, search: str = "grid", param_items: tuple[str, ...] = (),
               n_trials: int | None = None, seed: int = 0, share_prefixes: bool = True,
               exact: bool | None = None) -> SweepPlan:
    """Check every input and every trial's recipe; BadInput (exit 2) before any trial starts."""
    grids = gridmod.parse_grids(grid_items)
    objectives = objmod.parse_objectives(objective_items)
    constraints = [objmod.parse_constraint(c) for c in constraint_items]
    if workers is not None and workers < 1:
        raise BadInput(f"--workers must be at least 1, got {workers}")
    optuna = _plan_search(search, grids, param_items, n_trials, objectives, constraints, seed)
    trials = [] if optuna else gridmod.trials(grids, tuple(overrides))
    recipes: dict[str, Recipe] = {}
    for t in trials:
        recipes[t.id] = _trial_recipe(recipe_path, t.overrides, ", ".join(f"{k}={v}" for k, v in t.params.items()))
    base = _trial_recipe(recipe_path, tuple(overrides), "the recipe")
    if any(verify_index(r) < 0 for r in [base, *recipes.values()]):
        raise BadInput(f"{recipe_path}: a sweep needs a verify stage (objectives are read from its "
                       f"artifact rows; objectives: {', '.join(map(str, objectives))})")
    bounds = [_trial_recipe(recipe_path, (*overrides, f"{p.key}={text}"), f"--param {p.key}={text}")
              for p in (optuna.params if optuna else []) for text in p.texts()]
    requested = workers or min(optuna.trials if optuna else len(trials), os.cpu_count() or 1)
    # whose threads set the schedule: the grid's trials; for a search, the recipe and the --param bounds
    runs = {f"trial {k}": r for k, r in recipes.items()} or {"the recipe": base, **{
        f"--param value {i}": r for i, r in enumerate(bounds)}}
    sched = _schedule(requested, workers is not None, build_threads, exact, executor == "local", runs)
    if executor == "ray":
        from pipeline.sweep.executors import RayExecutor

        runner: Executor = RayExecutor(address)
    elif executor == "local":
        if address is not None:
            raise BadInput("--address is only meaningful with --executor ray")
        runner = LocalExecutor()
    else:
        raise BadInput(f"--executor: expected 'local' or 'ray', got '{executor}'")
    _check_same_mode(out, sched.exact)
    return SweepPlan(recipe_path, out, grids, tuple(overrides), trials, recipes, objectives, constraints, backend,
                     sched.workers, sched.threads, runner, address, retry_failed, optuna, base, share_prefixes,
                     sched.exact, requested, sched.notes)


@dataclass
class _Schedule:
    workers: int  # trial phases at once
    threads: int  # threads per worker (exact: the largest recipe `threads`, what sizes the pool)
    exact: bool
    notes: list[str]


def _schedule(requested: int, explicit: bool, build_threads: int | None, exact: bool | None, local: bool,
              recipes: dict[str, Recipe]) -> _Schedule:
    """Workers and threads. Exact (the default): every phase on its recipe's own `threads`, the
    thread count a single `fmap run` uses (results depend on it: fine-tuning, INT8 calibration);
    by default cores // threads trials at once, an explicit `--workers` above that is honoured.
    Not exact: cores // workers threads per worker."""
    if build_threads is not None and build_threads < 1:
        raise BadInput(f"--build-threads must be at least 1, got {build_threads}")
    other = next((f"{name} has threads: {r.threads}" for name, r in recipes.items()
                  if build_threads is not None and r.threads != build_threads), None)
    if exact and other:
        raise BadInput(f"--exact runs every trial on its recipe's threads, but --build-threads is {build_threads} "
                       f"and {other} (drop --build-threads, or pass --no-exact)")
    if exact is None:
        exact = other is None  # --build-threads N other than the recipe's threads implies --no-exact
    cores = os.cpu_count() or 1
    if not exact:
        return _Schedule(requested, build_threads or max(1, cores // requested), False, [])
    threads = max(r.threads for r in recipes.values())
    fit = max(1, cores // threads)
    # unasked, no more trials than the cores fit; asked for more (--workers), they share the cores
    # while building (each still on its recipe's threads), and latency waits for a quiet machine
    workers = requested if explicit or not local else min(requested, fit)
    notes = []
    if local and workers > fit:
        notes.append(f"--workers {requested} x the recipe's {threads} thread(s) on {cores} core(s): trials share the "
                     f"cores while building (results are those of their single runs all the same), and each "
                     f"trial measures latency while the others are paused; --workers {fit} keeps every "
                     f"trial on cores of its own")
    return _Schedule(workers, threads, True, notes)


def _check_same_mode(out: Path, exact: bool) -> None:
    """A sweep directory's finished trials and stage cache hold results of one mode (the thread
    count is not in the resume hash): resuming it in the other mode would mix them."""
    try:
        before = json.loads((out / "sweep.json").read_text())["executor"].get("exact", False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    if before != exact:
        was, now = ("--exact", "--no-exact") if before else ("--no-exact", "--exact")
        raise BadInput(f"{out} holds a sweep run with {was} (results depend on the thread count): resume it with "
                       f"{was}, or use another --out for {now}")


def _trial_recipe(recipe_path: Path, overrides: tuple[str, ...], point: str) -> Recipe:
    try:
        return load_recipe(recipe_path, overrides)
    except BadInput as exc:
        raise BadInput(f"sweep trial {point}: {exc}") from None


def _plan_search(search: str, grids: list[gridmod.Grid], param_items: tuple[str, ...], n_trials: int | None,
                 objectives: list[objmod.Objective], constraints: list[objmod.Constraint],
                 seed: int) -> OptunaSearch | None:
    """The Optuna search of `--search optuna` (None for a grid sweep), its options checked."""
    if search == "grid":
        if param_items or n_trials is not None:
            raise BadInput("--param and --trials need --search optuna (a grid sweep takes --grid)")
        return None
    if search != "optuna":
        raise BadInput(f"--search: expected 'grid' or 'optuna', got '{search}'")
    if grids:
        raise BadInput("--grid and --search optuna exclude each other (search a list with --param KEY=choice:A,B)")
    params = searchmod.parse_params(param_items)
    if n_trials is None or n_trials < 1:
        raise BadInput(f"--search optuna needs --trials N with N >= 1, got {n_trials}")
    searchmod.require_optuna()
    return OptunaSearch(params, objectives, constraints, n_trials, seed)


def _build_overrides(recipe: Recipe, threads: int, stages: int | None = None) -> tuple[str, ...]:
    """Extra `--set` items of the build phase: its threads, and only the (resolved) stages before
    the first verify (or the first `stages`). JSON is YAML, so `stages=[...]` is an ordinary override
    of the whole list."""
    prefix = [s.to_dict() for s in recipe.stages[:verify_index(recipe) if stages is None else stages]]
    return (f"threads={threads}", "stages=" + json.dumps(prefix, separators=(",", ":")))


def _prefix_waves(plan: SweepPlan, build: list[TrialTask]) -> list[list[TrialTask]]:
    """Tasks that compute each shared prefix once before the build phase (prefixes.py); none when
    prefixes are not shared or every one is in the stage cache already."""
    if not plan.share_prefixes or len(build) < 2:
        return []
    trials = {t.id: t for t in plan.trials}
    chains = {b.trial_id: stage_chain(plan.recipes[b.trial_id])[:verify_index(plan.recipes[b.trial_id])]
              for b in build}
    cache = plan.out / CACHE_DIR
    out = []
    for wave in prefixes.waves(chains):
        todo = [p for p in wave if not (cache / p.chain_hash / stagecache.ENTRY).is_file()]
        # a wave narrower than the pool leaves cores idle: up to the recipe's own threads per task
        spare = (os.cpu_count() or 1) // max(1, min(len(todo), plan.workers))
        tasks = []
        for p in todo:
            recipe = plan.recipes[p.trial_id]
            # exact: the recipe's threads, like every phase; else up to them on a narrow wave
            threads = plan.threads_of(recipe) if plan.exact else max(plan.threads_per_worker, min(recipe.threads, spare))
            tasks.append(TrialTask(p.trial_id, "prefix", str(plan.recipe_path), str(plan.out / "trials" / p.trial_id),
                                   threads, trials[p.trial_id].overrides + _build_overrides(recipe, threads, p.stages),
                                   str(cache)))
        if tasks:
            out.append(tasks)
    return out


def _is_done(run_dir: Path, final_lock: str) -> bool:
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        lock = (run_dir / "recipe.lock.yaml").read_text()
    except (OSError, ValueError):
        return False
    return manifest.get("status") in FINISHED and manifest.get("finished") is not None and lock == final_lock


def run_sweep(plan: SweepPlan, console: Console) -> SweepOutcome:
    """Run every trial not yet finished; write sweep.json after each result and all reports at the end."""
    from pipeline.sweep import report

    out = plan.out
    for note in plan.notes:
        console.print(escape(note), highlight=False)
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results: dict[str, list[dict[str, Any]]] = {t.id: [] for t in plan.trials}
    failed_before = {} if plan.retry_failed else _failed_before(out)
    if not (out / "sweep.json").exists():  # the mode is on disk before any stage reaches OUT/cache
        atomic.write_json(out / "sweep.json", report.collect(plan, results, started, "running"))
    interrupted = False
    try:
        if plan.search is None:
            _run_trials(plan, plan.trials, console, results, started, failed_before)
        else:
            _run_search(plan, plan.search, console, results, started, failed_before)
    except KeyboardInterrupt:
        interrupted = True
    data = report.collect(plan, results, started, "interrupted" if interrupted else "finished")
    report.write_all(out, data)
    if interrupted:
        console.print(f"interrupted: run the same command again to continue the sweep in {out}")
        return SweepOutcome(out, EXIT_INTERRUPTED, data)
    return SweepOutcome(out, report.exit_code(data), data)


def _run_search(plan: SweepPlan, search: OptunaSearch, console: Console, results: dict[str, list[dict[str, Any]]],
                started: str, failed_before: dict[str, dict[str, Any]]) -> None:
    """Ask Optuna for `--workers` trials at a time, run them, feed their rows back (search.py)."""
    from pipeline.sweep import report

    history: list[tuple[gridmod.Trial, dict[str, Any] | None]] = []
    batch = 0
    while len(history) < search.trials:
        # batches of the requested workers: exact mode's cap changes how trials run, not which are asked
        size = plan.requested_workers or plan.workers
        asked = search.ask(history, min(size, search.trials - len(history)), batch, plan.overrides)
        new = [t for t in dict((t.id, t) for t in asked).values() if t.id not in plan.recipes]
        for t in new:  # a point asked again (small discrete spaces) is not run twice
            plan.recipes[t.id] = _trial_recipe(plan.recipe_path, t.overrides, t.id)
            plan.trials.append(t)
            results[t.id] = []
        console.print(f"optuna batch {batch + 1}: {len(new)} new trial(s), "
                      f"{len(history) + len(asked)}/{search.trials} asked")
        _run_trials(plan, new, console, results, started, failed_before)
        rows = {r["id"]: r for r in report.collect(plan, results, started, "running")["trials"]}
        history += [(t, rows.get(t.id)) for t in asked]
        batch += 1


def _run_trials(plan: SweepPlan, trials: list[gridmod.Trial], console: Console,
                results: dict[str, list[dict[str, Any]]], started: str,
                failed_before: dict[str, dict[str, Any]]) -> None:
    """Run the given trials (shared prefixes, the build phase in parallel, then the serial timing
    phase; or, exact and local, each trial in one phase with latency timed while the others are
    paused); skip finished ones and ones that failed before with the same recipe."""
    out = plan.out
    build, final, skipped = _tasks(plan, trials)
    if skipped:
        console.print(f"{len(skipped)} of {len(trials)} trials already finished in {out} (resumed, not re-run)")
    keep = set()  # a trial that failed with this very recipe would fail again: keep its record
    for t in trials:
        old = failed_before.get(t.id)
        if old and old.get("recipe_sha256") == hashlib.sha256(recipe_text(out, t.id).encode()).hexdigest():
            results[t.id] = old.get("phases") or []
            keep.add(t.id)
    if keep:
        console.print(f"{len(keep)} trial(s) failed in an earlier sweep and are not retried (--retry-failed)")
        build = [b for b in build if b.trial_id not in keep]
        final = [f for f in final if f.trial_id not in keep]
    threads = "each on its recipe's threads (exact)" if plan.exact else f"{plan.threads_per_worker} thread(s) each"
    mode = (f"build phase on {plan.workers} workers, {threads}, then a serial timing phase" if plan.two_phase else
            f"{plan.workers} worker(s), {threads}" + (", latency measured with the others paused"
                                                      if plan.quiet_timing else ""))
    console.print(f"sweep: {len(trials)} trials, {len(final)} to run, {plan.executor.name} executor, {mode}")
    phases = [*_prefix_waves(plan, build), build]
    if plan.quiet_timing:
        final = _spread(final, {t.trial_id: stage_chain(plan.recipes[t.trial_id]) for t in final}, plan.workers)
    with _quiet(plan.executor) if isinstance(plan.executor, LocalExecutor) and plan.quiet_timing else \
            contextlib.nullcontext():
        _run_phases(plan, phases, final, console, results, started)


def _run_phases(plan: SweepPlan, phases: list[list[TrialTask]], final: list[TrialTask], console: Console,
                results: dict[str, list[dict[str, Any]]], started: str) -> None:
    """The build phases (prefixes, then builds) in parallel, then the last phase (serial when timed apart)."""
    from pipeline.sweep import report

    out = plan.out
    failed_build: set[str] = set()
    for tasks in phases:
        tasks = [t for t in tasks if t.trial_id not in failed_build]
        for n, res in enumerate(plan.executor.run(tasks, plan.workers), start=1):
            _note(console, res, n, len(tasks), results)
            if res.exit_code not in (0, 1):
                failed_build.add(res.trial_id)
            atomic.write_json(out / "sweep.json", report.collect(plan, results, started, "running"))
    final = [t for t in final if t.trial_id not in failed_build]
    workers = 1 if plan.two_phase else plan.workers
    timing = LocalExecutor() if plan.two_phase else plan.executor  # timing stays on this machine
    for n, res in enumerate(timing.run(final, workers), start=1):
        _note(console, res, n, len(final), results)
        atomic.write_json(out / "sweep.json", report.collect(plan, results, started, "running"))


@contextlib.contextmanager
def _quiet(executor: LocalExecutor) -> Iterator[None]:
    """The local executor's trials pause for each other's latency measurements (pipeline.quiet)."""
    executor.quiet = QuietServer()
    try:
        yield
    finally:
        executor.quiet.close()
        executor.quiet = None


def _spread(tasks: list[TrialTask], chains: dict[str, list[str]], workers: int) -> list[TrialTask]:
    """Trials in an order where the ones likely to run side by side share the fewest stages: a
    shared stage is computed by one trial while the other waits for it (pipeline.stagecache.claim).
    Greedy, stable: each next trial shares the fewest leading stages with the previous workers - 1."""
    def shared(a: str, b: str) -> int:
        n = 0
        for x, y in zip(chains[a], chains[b]):
            if x != y:
                break
            n += 1
        return n

    left, out = list(tasks), []
    while left:
        recent = out[-(workers - 1):] if workers > 1 else []
        best = min(left, key=lambda t: max((shared(t.trial_id, r.trial_id) for r in recent), default=0))
        out.append(best)
        left.remove(best)
    return out


def _tasks(plan: SweepPlan, trials: list[gridmod.Trial]) -> tuple[list[TrialTask], list[TrialTask], list[str]]:
    """(build-phase tasks, last-phase tasks, finished trial ids); writes each trial's final recipe."""
    build: list[TrialTask] = []
    final: list[TrialTask] = []
    skipped: list[str] = []
    cache = str(plan.out / CACHE_DIR) if plan.share_prefixes else None
    for t in trials:
        recipe = plan.recipes[t.id]
        run_dir = plan.out / "trials" / t.id
        # One worker, two phases or exact: the last phase runs with the recipe's own threads.
        if plan.two_phase or plan.workers == 1 or plan.exact:
            last_overrides, last = t.overrides, recipe
        else:
            last_overrides = (f"threads={plan.threads_per_worker}", *t.overrides)
            last = load_recipe(plan.recipe_path, last_overrides)
        final_lock = dump_lock(last)  # what the trial's recipe.lock.yaml says once it finished
        atomic.write_text(plan.out / "recipes" / f"{t.id}.yaml", final_lock)
        if _is_done(run_dir, final_lock):
            skipped.append(t.id)
            continue
        if plan.two_phase:
            threads = plan.threads_of(recipe)
            build.append(TrialTask(t.id, "build", str(plan.recipe_path), str(run_dir), threads,
                                   t.overrides + _build_overrides(recipe, threads), cache))
        # the serial timing phase only restores and measures: it offers nothing worth sharing
        final.append(TrialTask(t.id, "time" if plan.two_phase else "full", str(plan.recipe_path), str(run_dir),
                               last.threads, last_overrides, None if plan.two_phase else cache))
    return build, final, skipped


def _failed_before(out: Path) -> dict[str, dict[str, Any]]:
    """Trials recorded as failed in the previous sweep.json of this directory."""
    try:
        previous = json.loads((out / "sweep.json").read_text())
        return {t["id"]: t for t in previous.get("trials", []) if t.get("status") == "failed"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _note(console: Console, res: TrialResult, n: int, total: int, results: dict[str, list[dict[str, Any]]]) -> None:
    results[res.trial_id].append(res.to_dict())
    verdict = {0: "[green]ok[/]", 1: "[yellow]gate failed[/]"}.get(res.exit_code, f"[red]failed (exit {res.exit_code})[/]")
    why = f": {escape(res.error)}" if res.error and res.exit_code not in (0, 1) else ""
    console.print(f"\\[{res.phase} {n}/{total}] {escape(res.trial_id)} {verdict} in {res.seconds:.1f} s{why}",
                  highlight=False)
