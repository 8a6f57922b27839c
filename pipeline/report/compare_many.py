"""`fmap compare RUN_1 RUN_2 ... RUN_N`: N runs side by side, each judged against the FIRST.

The first run is the reference (main, the baseline); every other run is compared with it by the
same pairwise rules as two runs (pipeline.report.compare: within-run latency ratios, unchanged
sha256 never flagged, the same tolerances), so run 3 is never judged against run 2. The verdict is
a regression when ANY run regresses the reference; each regression names its run. With exactly
two runs, `fmap compare` keeps its two-run output (this module is used from three on).
"""

from __future__ import annotations

from typing import Any

from pipeline.report import fmt
from pipeline.report.compare import compare_runs


def compare_many(manifests: list[dict[str, Any]], names: list[str], **tolerances: float) -> dict[str, Any]:
    """manifests[0] is the reference. Returns {reference, runs, tolerances, rows, comparisons, regressions}."""
    pairs = [compare_runs(manifests[0], m, **tolerances) for m in manifests[1:]]
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for i, pair in enumerate(pairs, start=1):
        for d in pair["artifacts"]:
            row = rows.setdefault((d["artifact"], d["backend"]), _row(d, len(names)))
            row["cells"][i] = _cell(d, "b")
            row["regressed"][i] = bool(d["regressions"])
    regressions = [f"{names[i]}: {r}" for i, pair in enumerate(pairs, start=1) for r in pair["regressions"]]
    return {
        "reference": names[0],
        "runs": names,
        "tolerances": pairs[0]["tolerances"],
        "rows": list(rows.values()),
        "comparisons": [{"run": names[i], **pair} for i, pair in enumerate(pairs, start=1)],
        "regressions": regressions,
        "regressed": bool(regressions),
    }


def _cell(d: dict[str, Any], side: str) -> dict[str, Any]:
    return {"accuracy": d[f"accuracy_{side}"], "accuracy_metric": d["accuracy_metric"],
            "speedup": d[f"speedup_{side}"], "p50_ms": d[f"p50_ms_{side}"], "size_bytes": d[f"size_bytes_{side}"]}


def _row(d: dict[str, Any], n: int) -> dict[str, Any]:
    cells: list[dict[str, Any] | None] = [None] * n
    cells[0] = _cell(d, "a")
    return {"artifact": d["artifact"], "backend": d["backend"], "cells": cells, "regressed": [False] * n}


def cell_text(cell: dict[str, Any] | None) -> str:
    """accuracy · speedup · size of one artifact in one run ('–' where the run lacks it)."""
    if cell is None:
        return "–"
    return f"{fmt.pct(cell['accuracy'])} · {fmt.ratio_ci(cell['speedup'], None)} · {fmt.size(cell['size_bytes'])}"


def render_many_markdown(result: dict[str, Any]) -> str:
    """The N-run table as a pull-request comment; ❌ marks a cell that regresses the reference."""
    verdict = f"❌ {len(result['regressions'])} regression(s)" if result["regressed"] else "✅ no regression"
    runs = result["runs"]
    lines = [f"## fmap compare — {len(runs)} runs — {verdict}", "",
             f"Each run is judged against the first, `{runs[0]}` (reference). Cells: accuracy · speedup over the "
             "run's own original · size.", "",
             "| artifact | backend | " + " | ".join(f"`{r}`" for r in runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    for row in result["rows"]:
        cells = [cell_text(c) + (" ❌" if bad else "") for c, bad in zip(row["cells"], row["regressed"])]
        lines.append(f"| {row['artifact']} | {row['backend']} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in result["regressions"]:
        lines.append(f"- ❌ {r}")
    return "\n".join(lines) + "\n"
