"""`fmap sweep RECIPE --grid KEY=V1,V2 ...`: a thin Click layer over pipeline.sweep (docs/sweep.md)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("sweep")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--grid", "grids", multiple=True, metavar="KEY=V1,V2,...",
              help="Values of one recipe key (any --set key); several --grid give their product.")
@click.option("--search", type=click.Choice(["grid", "optuna"]), default="grid", show_default=True,
              help="grid: the product of --grid; optuna: --trials points asked from Optuna (pip install 'fmap[optuna]').")
@click.option("--param", "params", multiple=True, metavar="KEY=float:LO:HI|int:LO:HI|choice:A,B",
              help="A key Optuna searches (repeatable; ':log' after HI for a log scale).")
@click.option("--trials", "n_trials", type=int, default=None, help="Trials of an Optuna search.")
@click.option("--seed", "search_seed", type=int, default=0, show_default=True,
              help="Seed of the Optuna sampler (same seed and results: same trials).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key in every trial.")
@click.option("--objective", "objectives", multiple=True, metavar="NAME[:max|min]",
              help="Objective read from each run's deployable row (repeatable; default agreement:max "
                   "latency_ms:min size_mb:min).")
@click.option("--constraint", "constraints", multiple=True, metavar="EXPR",
              help="A requirement such as 'agreement>=0.99' (repeatable).")
@click.option("--backend", default=None, help="Read objectives from the deployable artifact's row on this backend "
              "(default: its first row).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Sweep directory: trials/<id>/ run directories, sweep.json, sweep.md, sweep.html.")
@click.option("--workers", type=int, default=None, help="Trials at once (default: min(trials, cores), with --exact at most cores // the recipe's threads; "
                   "more share the cores, each still on its recipe's threads, and time with the others paused).")
@click.option("--exact/--no-exact", default=None,
              help="--exact (default): every trial on its recipe's threads, so it reproduces its single fmap run "
                   "exactly; latency is measured while the other trials are paused. --no-exact: cores // workers "
                   "threads per worker while building (results may differ in the last digits).")
@click.option("--build-threads", type=int, default=None,
              help="Threads per worker while building (implies --no-exact unless equal to the recipe's threads; "
                   "default: cores // workers with --no-exact).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: a pool of processes here; ray: each trial a Ray task (pip install 'fmap[ray]').")
@click.option("--address", default=None, help="Ray cluster: 'auto' or ray://HOST:PORT (default: start a local one).")
@click.option("--share-prefixes/--no-share-prefixes", default=True, show_default=True,
              help="Trials that agree up to a stage compute it once (OUT/cache, keyed by the --resume hash).")
@click.option("--retry-failed", is_flag=True, help="On resume, run again the trials that failed before.")
@click.option("--json", "as_json", is_flag=True, help="Print sweep.json on stdout at the end.")
def sweep(recipe: Path, grids: tuple[str, ...], search: str, params: tuple[str, ...], n_trials: int | None,
          search_seed: int, overrides: tuple[str, ...], objectives: tuple[str, ...],
          constraints: tuple[str, ...], backend: str | None, out: Path, workers: int | None,
          exact: bool | None, build_threads: int | None, executor: str,
          address: str | None, share_prefixes: bool, retry_failed: bool, as_json: bool) -> int:
    """Run RECIPE over a grid of overrides or an Optuna search; leaderboard and Pareto front in OUT/sweep.{json,md,html}."""
    from pipeline.cli import make_console
    from pipeline.runner import sigterm_as_interrupt
    from pipeline.sweep.driver import plan_sweep, run_sweep

    console = make_console()
    plan = plan_sweep(recipe, out, grids, overrides, objectives, constraints, backend, workers, executor, address,
                      retry_failed, build_threads, search, params, n_trials, search_seed, share_prefixes,
                      exact)
    try:
        with sigterm_as_interrupt():  # CI cancelling the job: trials stop resumable, none stays paused
            outcome = run_sweep(plan, console)
    finally:
        close = getattr(plan.executor, "close", None)
        if close:
            close()
    s = outcome.data["summary"]
    console.print(f"sweep: {s['finished']}/{s['trials']} finished, {s['failed']} failed, {s['feasible']} feasible, "
                  f"{s['pareto']} on the Pareto front: {', '.join(outcome.data['pareto_front']) or 'none'}")
    console.print(f"wrote {out / 'sweep.md'}, {out / 'sweep.html'}, {out / 'sweep.json'}")
    if as_json:
        click.echo(json.dumps(outcome.data, indent=2))
    return outcome.exit_code
