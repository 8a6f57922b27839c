"""The `fmap` command line: parse, load, call, render, exit code. No pipeline logic lives here.

Exit codes: 0 ok and every gate passed, 1 a gate failed, 2 bad input, 3 a stage failed at run
time, 130 interrupted (docs/exit-codes.md).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import click

from pipeline import __version__
from pipeline.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_STAGE_FAILED, BadInput, FmapError

# Commands that live in their own modules, imported only when invoked (fast --help/validate).
LAZY_COMMANDS = {
    "profile": ("pipeline.commands.profile:profile", "Profile a model's feature maps without a recipe."),
    "report": ("pipeline.commands.report:report", "Regenerate reports from a run directory."),
    "compare": ("pipeline.commands.report:compare", "Compare runs with the first; exit 1 on regression."),
    "visualize": ("pipeline.commands.visualize:visualize", "Feature-map grids, overlays and Grad-CAM."),
    "sweep": ("pipeline.commands.sweep:sweep", "Run a recipe over a grid of overrides; leaderboard and Pareto front."),
}


def make_console(stderr: bool = True):
    """Rich console for progress and logs: colours and live bars off when not a TTY or in CI."""
    from pipeline.progress import LogConsole

    in_ci = bool(os.environ.get("CI"))
    stream = sys.stderr if stderr else sys.stdout
    # Logs (CI, files) get a fixed wide layout instead of rich's 80-column fallback.
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 140
    return LogConsole(stderr=stderr, no_color=in_ci or bool(os.environ.get("NO_COLOR")),
                   force_terminal=False if in_ci else None, highlight=False, width=width)


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            target, help_text = LAZY_COMMANDS[name]
            module_name, _, attr = target.partition(":")
            try:
                return getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as exc:  # a missing tool, not a broken CLI
                why = str(exc)  # `exc` is unbound after the except block; the closure needs a copy

                @click.command(name=name, help=f"{help_text} (unavailable: {why})",
                               context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
                def _missing() -> None:
                    raise FmapError(f"'fmap {name}' is unavailable in this installation: {why}")

                return _missing
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, (self.commands[n].get_short_help_str() if n in self.commands else LAZY_COMMANDS[n][1]))
                for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fmap")
@click.option("--plugin", "plugins", multiple=True, metavar="FILE.py|MODULE",
              help="Load a plug-in (backend, prune criterion, model source, report format) before the "
                   "command; repeatable. $FMAP_PLUGINS (os.pathsep-separated) is loaded first.")
def cli(plugins: tuple[str, ...]) -> None:
    """fmap: profile, prune, quantize, export and verify PyTorch vision models from one recipe."""
    from pipeline.plugins import env_plugins, load_plugins

    load_plugins([*env_plugins(), *plugins])


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set stages.prune.amount=0.3 (repeatable).")
@click.option("--resume", is_flag=True, help="Skip stages whose inputs and config are unchanged and whose artifacts exist.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default: runs/<name>).")
@click.option("--stage-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Reuse stages other runs finished with the same inputs and configs up to them, and offer "
                   "this run's (fmap sweep shares prefixes this way).")
@click.option("--nproc", type=int, default=None,
              help="Fine-tune (prune, QAT) with N data-parallel processes (torch.distributed DDP, gloo); "
                   "rank 0 writes the run.")
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable result on stdout.")
def run(recipe: Path, overrides: tuple[str, ...], resume: bool, out: Path | None, stage_cache: Path | None,
        nproc: int | None, as_json: bool) -> int:
    """Run every stage of RECIPE."""
    from pipeline.pruning import distributed
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_recipe
    from pipeline.run_summary import print_summary

    if distributed.launched_worker():  # torchrun rank > 0: serve rank 0's fine-tune, run no pipeline
        return distributed.serve_launched()
    console = make_console()
    loaded = load_recipe(recipe, overrides)
    distributed.check_recipe(loaded, nproc)
    console.print(f"[bold]fmap {__version__}[/] running recipe [bold]{loaded.name}[/] ({len(loaded.stages)} stages)"
                  f" -> {loaded.run_dir(out)}")
    with distributed.session(nproc, loaded.threads):
        outcome = run_recipe(loaded, out=out, resume=resume, console=console, stage_cache=stage_cache)
    if outcome.exit_code not in (EXIT_INTERRUPTED, EXIT_BAD_INPUT):  # bad input: just the one line
        print_summary(console, outcome.manifest)
    if as_json:
        click.echo(json.dumps(_json_result(outcome), indent=2))
    if outcome.error and outcome.exit_code not in (0, 1):
        if outcome.exit_code == EXIT_INTERRUPTED:
            console.print(f"interrupted: the run directory {outcome.run_dir} can be resumed with --resume")
        else:
            raise _reraise(outcome.exit_code, outcome.error)
    return outcome.exit_code


def _reraise(code: int, message: str) -> FmapError:
    exc = BadInput(message) if code == EXIT_BAD_INPUT else FmapError(message)
    exc.exit_code = code
    return exc


def _json_result(outcome) -> dict:
    m = outcome.manifest
    return {
        "run_dir": str(outcome.run_dir),
        "status": m.get("status"),
        "exit_code": outcome.exit_code,
        "error": outcome.error,
        "report": str(outcome.run_dir / "report.json"),
        "stages": [{"id": s["id"], "status": s["status"], "duration_s": s["duration_s"], "skip_reason": s["skip_reason"],
                    "resumed": s.get("resumed", False), "reused": bool(s.get("reused"))} for s in m.get("stages", [])],
        "failed_gates": outcome.failed_gates,
    }


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
@click.option("--build", is_flag=True,
              help="Also build the model, run it on one batch of every data split and check the stages fit it.")
def validate(recipe: Path, overrides: tuple[str, ...], build: bool) -> int:
    """Check RECIPE without running it (schema, stage names, keys); exit 2 on the first problem."""
    from pipeline.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    loaded.run_dir()  # an output_dir outside the recipe's folder is refused here too
    if build:
        from pipeline.preflight import preflight

        for line in preflight(loaded):
            click.echo(f"  {line}")
    click.echo(f"{recipe}: ok ({loaded.name}: {', '.join(s.id for s in loaded.stages)})")
    return 0


@cli.command()
@click.option("--model", "model_spec", default="builtin:digits_cnn", show_default=True,
              help="Model spec: builtin:NAME, torchvision:NAME, timm:NAME, python:file.py:factory, "
                   "python:package.module:factory, onnx:PATH (or a .onnx path), torchscript:PATH, exported:PATH.")
@click.option("--data", "data_dir", default=None, type=click.Path(),
              help="A labelled image folder (DIR/<class>/<image>): split into calibration and eval, accuracy gates.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=Path("recipe.yaml"),
              show_default=True, help="Where to write the starter recipe.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(model_spec: str, data_dir: str | None, out_file: Path, force: bool) -> int:
    """Write a commented starter recipe for MODEL."""
    from pipeline import atomic
    from pipeline.recipe import parse_recipe
    from pipeline.starter import starter_recipe

    if out_file.exists() and not force:
        raise BadInput(f"'{out_file}' already exists (use --force to overwrite)")
    text = starter_recipe(model_spec, data_dir, file=str(out_file))
    parse_recipe(text, str(out_file))  # never write a starter that does not validate
    atomic.write_text(out_file, text)
    click.echo(f"wrote {out_file}; run it with: fmap run {out_file}")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point: map every failure to its exit code and a one-line message, never a traceback."""
    from pipeline.verify.threads import quiet_thread_pools

    quiet_thread_pools()  # before anything imports torch: OpenMP reads it once
    try:
        rv = cli.main(args=argv, prog_name="fmap", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors: bad option, missing argument; one line
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(EXIT_BAD_INPUT if exc.exit_code == 2 else exc.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except FmapError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # an fmap bug: still one line on the console, the traceback on request
        if os.environ.get("FMAP_DEBUG"):
            raise
        click.echo(f"error: internal error: {type(exc).__name__}: {exc} (set FMAP_DEBUG=1 for the traceback)", err=True)
        sys.exit(EXIT_STAGE_FAILED)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
