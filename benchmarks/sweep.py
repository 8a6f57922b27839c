"""Sweep benchmark: an 8-trial grid over the quickstart with `fmap sweep --workers 2` against the same
8 runs one after another (`fmap run --set ...`), and whether each trial's results are identical.

    .venv/bin/python benchmarks/sweep.py                # prints the table
    .venv/bin/python benchmarks/sweep.py --write        # also replaces its section in RESULTS.md
    .venv/bin/python benchmarks/sweep.py --prefixes     # a quantize-only grid with and without shared prefixes
    .venv/bin/python benchmarks/sweep.py --no-exact     # the sweep with cores // workers build threads

The sweep runs in `fmap sweep`'s default exact mode (every phase on the recipe's threads, at most
cores // threads at once) unless --no-exact; the table says which mode ran and how many workers.

Compared per trial: every artifact row's top-1, agreement and size (report.json), the pruned
channel count of every layer (prune metrics) and the layers the INT8 fallback kept in float
(quantize metrics). Latencies are NOT compared (they are measurements, not results).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_line, write_section  # noqa: E402
from pipeline.sweep.grid import parse_grids, trials  # noqa: E402

SECTION = "## Sweep: 2 workers vs one run after another (benchmarks/sweep.py)"
GRID = ("stages.prune.amount=0.3,0.4,0.5,0.6", "stages.quantize.per_channel=true,false")
PREFIX_SECTION = "## Sweep: shared prefixes, a grid over quantize settings only (benchmarks/sweep.py --prefixes)"
PREFIX_GRID = ("stages.quantize.calibration=minmax,percentile", "stages.quantize.per_channel=true,false")


def heading(section: str, args: argparse.Namespace) -> str:
    """The RESULTS.md heading of a measurement: --no-exact runs keep their own section."""
    return section[:-1] + " --no-exact)" if args.no_exact else section


def exactness(args: argparse.Namespace) -> list[str]:
    """The sweep's mode flag: fmap sweep's default (exact) unless --no-exact."""
    return ["--no-exact"] if args.no_exact else []


def fmap(*args: str) -> float:
    """Run `fmap ARGS` in a fresh process; return its wall time in seconds (fail loudly)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"fmap {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def results(run_dir: Path) -> dict[str, Any]:
    """What must not depend on how the run was scheduled."""
    report = json.loads((run_dir / "report.json").read_text())
    stages = {s["id"]: s.get("metrics", {}) for s in report["stages"]}
    return {
        "rows": sorted((r["artifact"], r["backend"], r["top1"], r["agreement"], r["size_bytes"])
                       for r in report["artifacts"]),
        "channels": [(layer["name"], layer["channels_after"]) for layer in stages.get("prune", {}).get("layers", [])],
        "float_layers": stages.get("quantize", {}).get("fallback", {}).get("float_layers"),
    }


def computed(run_dir: Path) -> list[str]:
    """The stages this trial computed itself (not copied from another trial's, pipeline.stagecache)."""
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    return [s["id"] for s in stages if not s.get("reused")]


def prefixes(args: argparse.Namespace, work: Path) -> str:
    """Both sweeps of PREFIX_GRID side by side: --no-share-prefixes, then the default."""
    points = trials(parse_grids(PREFIX_GRID))
    grid_args = list(itertools.chain.from_iterable(("--grid", g) for g in PREFIX_GRID))
    common = list(itertools.chain.from_iterable(("--set", o) for o in args.sets))
    times, load0 = {}, os.getloadavg()[0]
    for mode in ("--no-share-prefixes", "--share-prefixes"):
        shutil.rmtree(work / mode, ignore_errors=True)
        times[mode] = fmap("sweep", args.recipe, *common, *grid_args, "--workers", str(args.workers), mode,
                           *exactness(args), "--out", str(work / mode))
        print(f"sweep {mode}: {times[mode]:.1f} s", file=sys.stderr)
    runs = {m: [computed(work / m / "trials" / t.id) for t in points] for m in times}
    count = {m: {k: sum(k in c for c in runs[m]) for k in ("profile", "prune", "export", "quantize")} for m in runs}
    same = [results(work / "--no-share-prefixes" / "trials" / t.id) == results(work / "--share-prefixes" / "trials" / t.id)
            for t in points]
    base = times["--no-share-prefixes"]
    rows = [f"| `fmap sweep --workers {args.workers}{' --no-exact' if args.no_exact else ''} {m}` | {times[m]:.1f} s | {times[m] / base:.2f} | "
            + " / ".join(str(count[m][k]) for k in count[m]) + " |" for m in times]
    return "\n".join([
        heading(PREFIX_SECTION, args), "",
        f"Grid `{' × '.join(PREFIX_GRID)}` over `{args.recipe}`: {len(points)} trials that differ only after "
        f"export. Command: `python benchmarks/sweep.py --prefixes --workers {args.workers}"
        f"{' --no-exact' if args.no_exact else ''}"
        f"{''.join(' --set ' + o for o in args.sets)}`. {machine_line(1)} Load average (1 min) "
        f"{load0:.1f} before, {os.getloadavg()[0]:.1f} after." + (f" {args.note}" if args.note else ""), "",
        "| sweep | wall time | relative | profile / prune / export / quantize computed (of " + str(len(points)) + ") |",
        "|---|---|---|---|", *rows, "",
        f"Results identical with and without sharing (top-1, agreement and size of every artifact row, channels "
        f"per layer, layers kept in float): {sum(same)}/{len(same)} trials.", ""])


def schedule_table(args: argparse.Namespace, points: list, serial: float, swept: float, same: list[bool],
                   sweep_json: dict[str, Any]) -> list[str]:
    """The section's lines: both schedules' wall times, the sweep's mode, how many trials matched."""
    ex = sweep_json["executor"]
    threads = ex["threads_per_worker"]
    mode = (f"exact: {ex['workers']} worker(s) x the recipe's {threads} thread(s)" if ex.get("exact") else
            f"--no-exact: {ex['workers']} worker(s) x {threads} thread(s) while building")
    flag = " --no-exact" if args.no_exact else ""
    return [
        heading(SECTION, args), "",
        f"Grid `{' × '.join(GRID)}` over `{args.recipe}`: {len(points)} trials. Command: "
        f"`python benchmarks/sweep.py --workers {args.workers}{flag}{''.join(' --set ' + o for o in args.sets)}"
        f"{' --write' if args.write else ''}`. "
        f"{machine_line(threads)}" + (f" {args.note}" if args.note else ""), "",
        "| schedule | wall time | relative |",
        "|---|---|---|",
        f"| {len(points)} × `fmap run`, one after another | {serial:.1f} s | 1.00 |",
        f"| `fmap sweep --workers {args.workers}{flag}` ({mode}, {ex['timing']}) | {swept:.1f} s | "
        f"{swept / serial:.2f} |",
        "",
        f"Results identical to the single runs (top-1, agreement and size of every artifact row, channels per "
        f"layer, layers kept in float): {sum(same)}/{len(same)} trials"
        + ("" if all(same) else f" (differ: {', '.join(t.id for t, s in zip(points, same) if not s)})") + ".",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override applied to every run of both schedules (e.g. a shorter fine-tune)")
    ap.add_argument("--out", type=Path, default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--note", default="", help="a sentence about the machine's state for RESULTS.md")
    ap.add_argument("--write", action="store_true", help=f"replace '{SECTION}' in benchmarks/RESULTS.md")
    ap.add_argument("--prefixes", action="store_true", help="measure shared prefixes instead (its own section)")
    ap.add_argument("--no-exact", action="store_true",
                    help="pass --no-exact to fmap sweep (cores // workers build threads; default: exact mode)")
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="fmap-sweep-bench-"))
    if args.prefixes:
        text = prefixes(args, work)
        print(text)
        if args.write:
            write_section(text, heading(PREFIX_SECTION, args))
        return 0
    shutil.rmtree(work / "serial", ignore_errors=True)
    shutil.rmtree(work / "sweep", ignore_errors=True)
    points = trials(parse_grids(GRID))
    grid_args = list(itertools.chain.from_iterable(("--grid", g) for g in GRID))
    common = list(itertools.chain.from_iterable(("--set", o) for o in args.sets))

    serial = 0.0
    for t in points:
        sets = list(itertools.chain.from_iterable(("--set", o) for o in t.overrides))
        serial += fmap("run", args.recipe, *common, *sets, "--out", str(work / "serial" / t.id))
        print(f"serial {t.id}: {serial:.1f} s so far", file=sys.stderr)
    swept = fmap("sweep", args.recipe, *common, *grid_args, "--workers", str(args.workers), *exactness(args),
                 "--out", str(work / "sweep"))
    print(f"sweep: {swept:.1f} s", file=sys.stderr)

    same = [results(work / "serial" / t.id) == results(work / "sweep" / "trials" / t.id) for t in points]
    table = schedule_table(args, points, serial, swept, same, json.loads((work / "sweep" / "sweep.json").read_text()))
    text = "\n".join(table) + "\n"
    print(text)
    if args.write:
        write_section(text, heading(SECTION, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
