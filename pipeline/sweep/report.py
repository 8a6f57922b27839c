"""The sweep's results: sweep.json (machines), sweep.md (pull requests), sweep.html (people).

All three are built from one dict (`collect`), so they agree. The HTML is one self-contained file:
inline CSS, the Pareto plot as a base64 PNG with an image map (each point links to its trial's
report.html), no scripts, no network.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import atomic
from pipeline.errors import EXIT_GATE_FAILED, EXIT_OK, EXIT_STAGE_FAILED
from pipeline.sweep import objectives as objmod
from pipeline.sweep.pareto import front

if TYPE_CHECKING:
    from pipeline.sweep.plan import SweepPlan

SCHEMA_VERSION = "1.1"  # 1.1: executor.exact, executor.requested_workers


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def recipe_text(out: Path, trial_id: str) -> str:
    """The resolved recipe of a trial's last phase, written by the driver before any trial runs."""
    return (out / "recipes" / f"{trial_id}.yaml").read_text()


def _trial_row(plan: SweepPlan, trial: Any, phases: list[dict[str, Any]]) -> dict[str, Any]:
    run_dir = plan.out / "trials" / trial.id
    manifest = _read_json(run_dir / "manifest.json") or {}
    try:
        final_lock = recipe_text(plan.out, trial.id)
        lock = (run_dir / "recipe.lock.yaml").read_text()
    except OSError:
        final_lock, lock = None, ""
    done = manifest.get("status") in ("ok", "gate_failed") and manifest.get("finished") and lock == final_lock
    failed = [p for p in phases if p["exit_code"] not in (0, 1)]
    if done:
        status = manifest["status"]
    elif manifest.get("status") in ("failed", "interrupted"):
        status = manifest["status"]
    elif failed:
        status = "failed"
    else:
        status = "pending"
    error = manifest.get("error") if status in ("failed", "interrupted") else None
    if status == "failed" and not error and failed:
        error = failed[-1]["error"]
    report = _read_json(run_dir / "report.json") if done else None
    row = objmod.deployable_row(report, plan.backend) if report else None
    names = list(dict.fromkeys([o.name for o in plan.objectives] + [c.name for c in plan.constraints]))
    vals = objmod.values(row, names)
    violations = [str(c) for c in plan.constraints if not c.holds(vals[c.name])] if done else []
    return {
        "id": trial.id,
        "params": trial.params,
        "overrides": list(trial.overrides),
        "run_dir": f"trials/{trial.id}",
        "recipe": f"recipes/{trial.id}.yaml",
        "recipe_sha256": hashlib.sha256(final_lock.encode()).hexdigest() if final_lock else None,
        "status": status,
        "error": error,
        "artifact": row.get("artifact") if row else None,
        "backend": row.get("backend") if row else None,
        "objectives": vals,
        "feasible": bool(done and row is not None and not violations),
        "violations": violations,
        "pareto": False,
        "phases": phases,
        "report_html": f"trials/{trial.id}/report.html" if (run_dir / "report.html").is_file() else None,
        "report_md": f"trials/{trial.id}/report.md" if (run_dir / "report.md").is_file() else None,
    }


def collect(plan: SweepPlan, results: dict[str, list[dict[str, Any]]], started: str, status: str) -> dict[str, Any]:
    """The whole sweep as one dict: settings, every trial (leaderboard order) and the front."""
    rows = [_trial_row(plan, t, results.get(t.id, [])) for t in plan.trials]
    names = [o.name for o in plan.objectives]
    directions = [o.direction for o in plan.objectives]
    candidates = {r["id"]: [r["objectives"][n] for n in names] for r in rows
                  if r["feasible"] and all(r["objectives"][n] is not None for n in names)}
    pareto = front(candidates, directions)
    for r in rows:
        r["pareto"] = r["id"] in pareto

    def key(r: dict[str, Any]) -> tuple:
        signed = [(v if d == "max" else -v) if v is not None else float("-inf")
                  for v, d in zip((r["objectives"][n] for n in names), directions)]
        return (not r["pareto"], not r["feasible"], r["status"] not in ("ok", "gate_failed"), [-s for s in signed])

    rows.sort(key=key)
    for rank, r in enumerate(rows, start=1):
        r["rank"] = rank
    return {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "recipe": str(plan.recipe_path),
        "out": str(plan.out),
        "started": started,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "grid": {g.key: list(g.values) for g in plan.grids},
        "search": plan.search.describe() if plan.search else {"strategy": "grid"},
        "overrides": list(plan.overrides),
        "objectives": [{"name": o.name, "direction": o.direction} for o in plan.objectives],
        "constraints": [str(c) for c in plan.constraints],
        "backend": plan.backend,
        "executor": {"name": plan.executor.name, "address": plan.executor_address, "workers": plan.workers,
                     "threads_per_worker": plan.threads_per_worker, "exact": plan.exact,
                     "requested_workers": plan.requested_workers,
                     "timing": ("serial timing phase" if plan.two_phase else
                                "others paused while each trial times" if plan.quiet_timing else "one phase"),
                     "share_prefixes": plan.share_prefixes},
        "summary": {"trials": len(rows), "finished": sum(r["status"] in ("ok", "gate_failed") for r in rows),
                    "failed": sum(r["status"] == "failed" for r in rows),
                    "feasible": sum(r["feasible"] for r in rows), "pareto": len(pareto)},
        "pareto_front": [r["id"] for r in rows if r["pareto"]],
        "trials": rows,
    }


def exit_code(data: dict[str, Any]) -> int:
    """0: at least one trial meets every constraint; 1: none does; 3: every trial failed."""
    s = data["summary"]
    if s["trials"] and s["failed"] == s["trials"]:
        return EXIT_STAGE_FAILED
    return EXIT_OK if s["feasible"] else EXIT_GATE_FAILED


# -- formatting ---------------------------------------------------------------------------------


def _value(v: float | None, name: str) -> str:
    if v is None:
        return "n/a"
    unit = objmod.METRICS[name][2]
    if name in ("agreement", "top1", "accuracy", "top5"):
        return f"{100 * v:.2f}%"
    return f"{v:.4g}{(' ' + unit) if unit else ''}"


def executor_line(ex: dict[str, Any]) -> str:
    """How the trials ran, and whether each reproduces its single `fmap run` (the thread count)."""
    mode = ("exact: each trial on its recipe's threads, as its single fmap run" if ex.get("exact") else
            f"not exact (--no-exact: built on {ex['threads_per_worker']} thread(s) per worker, results may differ "
            "from single runs in the last digits)")
    return f"{ex['name']}, {ex['workers']} worker(s) x {ex['threads_per_worker']} thread(s), {ex['timing']}, {mode}"


def _params(r: dict[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1] if '.' in k else k}={json.dumps(v)}" for k, v in r["params"].items()) or "-"


def render_markdown(data: dict[str, Any]) -> str:
    names = [o["name"] for o in data["objectives"]]
    s = data["summary"]
    lines = [f"# fmap sweep: {data['recipe']}", "",
             f"{s['trials']} trials · {s['finished']} finished · {s['failed']} failed · {s['feasible']} meet the "
             f"constraints ({', '.join(data['constraints']) or 'none'}) · {s['pareto']} on the Pareto front of "
             f"{', '.join(o['name'] + ' (' + o['direction'] + ')' for o in data['objectives'])}", "",
             "| rank | trial | parameters | status | " + " | ".join(names) + " | feasible | Pareto | report |",
             "|---|---|---|---|" + "---|" * len(names) + "---|---|---|"]
    for r in data["trials"]:
        status = r["status"] + (f": {r['error']}" if r["error"] else "")
        link = f"[report]({r['report_md']})" if r["report_md"] else "–"
        vals = " | ".join(_value(r["objectives"][n], n) for n in names)
        feas = "yes" if r["feasible"] else ("no (" + ", ".join(r["violations"]) + ")" if r["violations"] else "no")
        lines.append(f"| {r['rank']} | `{r['id']}` | {_params(r)} | {status.replace('|', '/')} | {vals} | {feas} | "
                     f"{'**yes**' if r['pareto'] else ''} | {link} |")
    lines += ["", f"Executor: {executor_line(data['executor'])}. Values are read from each run's deployable artifact row"
              f"{' on ' + data['backend'] if data['backend'] else ''}.", ""]
    return "\n".join(lines)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}tr.pareto{background:#fff4e5;font-weight:600}
.failed{color:#b00020}img{max-width:100%;border:1px solid #eee}
"""


def plot_front(data: dict[str, Any]) -> tuple[str, list[tuple[str, float, float, str]]] | None:
    """Scatter of the first objective against the second, front highlighted. Returns the base64
    PNG and, per plotted point, (trial id, pixel x, pixel y, label) for the image map."""
    objs = data["objectives"]
    pts = [r for r in data["trials"] if r["objectives"].get(objs[0]["name"]) is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    yname = objs[0]["name"]
    xname = objs[1]["name"] if len(objs) > 1 else None
    xs = [r["objectives"][xname] if xname else r["rank"] for r in pts]
    ys = [r["objectives"][yname] for r in pts]
    keep = [i for i, x in enumerate(xs) if x is not None]
    pts, xs, ys = [pts[i] for i in keep], [xs[i] for i in keep], [ys[i] for i in keep]
    dpi = 90
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=dpi)
    colors = ["#d95f02" if r["pareto"] else ("#1b9e77" if r["feasible"] else "#999999") for r in pts]
    ax.scatter(xs, ys, c=colors, s=[90 if r["pareto"] else 40 for r in pts], edgecolors="k", linewidths=0.5, zorder=3)
    for x, y, r in zip(xs, ys, pts):
        ax.annotate(f"#{r['rank']}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"{xname} ({objs[1]['direction']})" if xname else "rank")
    ax.set_ylabel(f"{yname} ({objs[0]['direction']})")
    ax.set_title(f"orange: Pareto front over {len(objs)} objective(s) · green: meets the constraints · grey: does not",
                 fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()
    height = fig.get_size_inches()[1] * dpi
    spots = []
    for x, y, r in zip(xs, ys, pts):
        px, py = ax.transData.transform((x, y))
        spots.append((r["id"], float(px), float(height - py), f"#{r['rank']} {_params(r)}"))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii"), spots


def render_html(data: dict[str, Any]) -> str:
    e = html.escape
    names = [o["name"] for o in data["objectives"]]
    s = data["summary"]
    links = {r["id"]: r["report_html"] for r in data["trials"]}
    parts = [f"<h1>fmap sweep: {e(data['recipe'])}</h1>",
             f"<p id=\"summary\">{s['trials']} trials · {s['finished']} finished · {s['failed']} failed · "
             f"{s['feasible']} meet the constraints ({e(', '.join(data['constraints']) or 'none')}) · "
             f"{s['pareto']} on the Pareto front</p>"]
    plot = plot_front(data)
    if plot:
        png, spots = plot
        areas = "".join(f'<area shape="circle" coords="{px:.0f},{py:.0f},8" href="{e(links[i])}" alt="{e(label)}" '
                        f'title="{e(label)}">' for i, px, py, label in spots if links.get(i))
        parts.append(f'<img id="front" src="data:image/png;base64,{png}" usemap="#front-map" alt="Pareto front">'
                     f'<map name="front-map">{areas}</map>')
    head = "".join(f"<th>{e(n)} ({e(o['direction'])})</th>" for n, o in zip(names, data["objectives"]))
    rows = []
    for r in data["trials"]:
        vals = "".join(f'<td class="num">{e(_value(r["objectives"][n], n))}</td>' for n in names)
        trial = f'<a href="{e(r["report_html"])}">{e(r["id"])}</a>' if r["report_html"] else e(r["id"])
        status = e(r["status"]) + (f": {e(r['error'])}" if r["error"] else "")
        feas = "yes" if r["feasible"] else ("no (" + e(", ".join(r["violations"])) + ")" if r["violations"] else "no")
        cls = "pareto" if r["pareto"] else ("failed" if r["status"] == "failed" else "")
        rows.append(f'<tr class="{cls}"><td>{r["rank"]}</td><td>{trial}</td><td>{e(_params(r))}</td>'
                    f'<td>{status}</td>{vals}<td>{feas}</td><td>{"yes" if r["pareto"] else ""}</td></tr>')
    parts.append(f'<table id="leaderboard"><tr><th>rank</th><th>trial</th><th>parameters</th><th>status</th>{head}'
                 f"<th>feasible</th><th>Pareto</th></tr>{''.join(rows)}</table>")
    parts.append(f"<p id=\"executor\">Executor: {e(executor_line(data['executor']))}. Updated {e(data['updated'])}.</p>")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>fmap sweep</title><style>{CSS}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")


def write_all(out: Path, data: dict[str, Any]) -> dict[str, Path]:
    """Write sweep.json, sweep.md and sweep.html atomically; returns {format: path}."""
    return {"json": atomic.write_json(out / "sweep.json", data),
            "md": atomic.write_text(out / "sweep.md", render_markdown(data)),
            "html": atomic.write_text(out / "sweep.html", render_html(data))}
