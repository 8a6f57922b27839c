"""Are fmap's speedups trustworthy on a busy machine? Re-time a finished run's verify stage twice,
once as the machine is and once beside N extra CPU-bound processes, then `fmap compare` the two.

    python benchmarks/busy_timing.py --run runs/quickstart --busy 2 --iterations 60

Each leg copies the run directory and resumes it with a changed iteration count, so only verify
(and the stages after it) run again on the same artifacts. Prints, per artifact@backend, the
speedup vs the original in torch and vs the same runtime's FP32 artifact in both legs, the
relative change of each, the load seen, and compare's verdict. The busy processes are started and
stopped by this script (by pid).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fmap(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), CI="1")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=1800)


def leg(run: Path, recipe: str, out: Path, iterations: int, busy: int) -> dict:
    shutil.copytree(run, out)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        proc = fmap("run", recipe, "--out", str(out), "--resume",
                    "--set", f"stages.verify.latency.iterations={iterations}")
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    if proc.returncode not in (0, 1):
        raise SystemExit(f"fmap run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads((out / "report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished run directory (e.g. of quickstart)")
    ap.add_argument("--busy", type=int, default=2, help="extra CPU-bound processes in the busy leg")
    ap.add_argument("--iterations", type=int, default=60)
    args = ap.parse_args()
    manifest = json.loads((args.run / "manifest.json").read_text())
    recipe = manifest["recipe_path"]
    tmp = Path(tempfile.mkdtemp(prefix="fmap-busy-"))
    try:
        quiet = leg(args.run, recipe, tmp / "as_is", args.iterations, 0)
        busy = leg(args.run, recipe, tmp / "busy", args.iterations, args.busy)
        cmp = fmap("compare", str(tmp / "as_is"), str(tmp / "busy"), "--json")
        result = json.loads(cmp.stdout) if cmp.stdout.strip() else {}
        print(f"load (1 min) as-is: {_loads(quiet)}; with {args.busy} busy processes: {_loads(busy)}")
        print("| artifact@backend | vs original: as-is → busy (change) "
              "| vs same-runtime FP32: as-is → busy (change) |")
        print("|---|---|---|")
        rows_b = {(r["artifact"], r["backend"]): r for r in busy["artifacts"]}
        for r in quiet["artifacts"]:
            b = rows_b.get((r["artifact"], r["backend"]))
            if b is None or r["baseline"]:
                continue
            print(f"| {r['artifact']}@{r['backend']} | {_pair(r['speedup'], b['speedup'])} | "
                  f"{_pair(r.get('speedup_fp32'), b.get('speedup_fp32'))} |")
        print(f"fmap compare as-is busy: exit {cmp.returncode}, regressions: {result.get('regressions')}")
        back = fmap("compare", str(tmp / "busy"), str(tmp / "as_is"), "--json")
        print(f"fmap compare busy as-is: exit {back.returncode}, regressions: "
              f"{json.loads(back.stdout).get('regressions') if back.stdout.strip() else back.stderr[-300:]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _loads(report: dict) -> str:
    cond = (report.get("machine") or {}).get("conditions") or {}
    return ", ".join(f"batch {bs}: {c['load_avg_1m_before']}→{c['load_avg_1m_after']}" for bs, c in cond.items())


def _pair(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "n/a"
    return f"{a:.2f}x → {b:.2f}x ({100 * (b / a - 1):+.1f}%)"


if __name__ == "__main__":
    main()
