"""CI gates: thresholds from the recipe checked against verify's measurements.

Which artifact a gate judges (docs/gates.md): by default the *deployable* artifact, i.e. the last
model artifact the run produced (the one you would ship), on every backend that ran it; or every
measured artifact (`apply_to: all`), or a named list. A gate that cannot be measured fails, with
the reason in `detail`: a gate never passes on a number that was not measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from pipeline.stages.base import GateResult, StageConfig

MB = 1024 * 1024  # "MB" in gate names means MiB (2**20 bytes), as in the reports


class SpeedupGate(StageConfig):
    """`min_speedup: {value: 2.0, vs: onnx_fp32}`: the speedup over a named baseline.

    vs: `original` (the original model in torch: what a plain number means), `fp32` (the same
    runtime's FP32 artifact: what compression bought, the runtime switch factored out), or the
    name of any measured artifact (e.g. `onnx_fp32`), timed on the same backend.
    """

    value: float = Field(gt=0)
    vs: str = Field(default="original", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")


class GatesConfig(StageConfig):
    """All thresholds optional; only the ones set are evaluated."""

    max_accuracy_drop: float | None = Field(default=None, ge=0)  # absolute top-1 fraction: 0.01 = 1 point
    min_agreement: float | None = Field(default=None, ge=0, le=1)  # top-1 agreement with the original
    # median latency ratio baseline/artifact; a plain number: baseline = the original in torch
    min_speedup: float | SpeedupGate | None = Field(default=None)
    max_size_mb: float | None = Field(default=None, gt=0)  # artifact file size (state_dict for in-memory)
    max_peak_memory_mb: float | None = Field(default=None, gt=0)  # RSS delta of load + first batch
    max_latency_ms: float | None = Field(default=None, gt=0)  # p50 at the gate batch size
    apply_to: Literal["deployable", "all"] | list[str] = "deployable"

    @field_validator("min_speedup")
    @classmethod
    def _positive(cls, v: float | SpeedupGate | None) -> float | SpeedupGate | None:
        if isinstance(v, float) and v <= 0:
            raise ValueError("expected a positive number or {value: N, vs: BASELINE}")
        return v

    @property
    def speedup_vs(self) -> str:
        """The baseline min_speedup is judged against: original, fp32, or an artifact name."""
        return self.min_speedup.vs if isinstance(self.min_speedup, SpeedupGate) else "original"

    def thresholds(self) -> dict[str, float]:
        names = ("max_accuracy_drop", "min_agreement", "min_speedup", "max_size_mb",
                 "max_peak_memory_mb", "max_latency_ms")
        out = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if isinstance(out.get("min_speedup"), SpeedupGate):
            out["min_speedup"] = out["min_speedup"].value
        return out


def gate_targets(cfg: GatesConfig, deployable: str | None, measured: Sequence[str],
                 baseline: str) -> list[str]:
    """Artifact names the gates judge: resolved from `apply_to`."""
    if cfg.apply_to == "deployable":
        return [deployable] if deployable else []
    if cfg.apply_to == "all":
        return [a for a in dict.fromkeys(measured) if a != baseline] or [baseline]
    return list(cfg.apply_to)


def evaluate_gates(cfg: GatesConfig, results: Sequence[dict[str, Any]], targets: Sequence[str],
                   baseline: str = "original", batch_size: int = 1,
                   unmeasured: dict[str, str] | None = None) -> list[GateResult]:
    """One GateResult per gate and target (artifact@backend for per-backend gates).

    `results` are verify's rows ({artifact, backend, accuracy, latency, speedup, size_bytes, memory});
    the baseline row is the first row of the baseline artifact (torch). `unmeasured` maps an
    artifact to why it has no rows, for the failure detail.
    """
    thresholds = cfg.thresholds()
    if not thresholds:
        return []
    base = next((r for r in results if r["artifact"] == baseline and not r.get("error")), None)
    base_top1 = ((base or {}).get("accuracy") or {}).get("top1")
    gates: list[GateResult] = []
    for target in targets:
        rows = [r for r in results if r["artifact"] == target]
        if not rows:
            why = (unmeasured or {}).get(target, "no backend ran it")
            gates += [GateResult(n, t, None, False, target, f"not measured: {why}") for n, t in thresholds.items()]
            continue
        if "max_size_mb" in thresholds:
            size = rows[0].get("size_bytes")
            value = None if size is None else size / MB
            gates.append(_check("max_size_mb", thresholds["max_size_mb"], value, target,
                                "file size unknown" if value is None else f"{value:.3f} MB"))
        for row in rows:
            where = f"{target}@{row['backend']}"
            if row.get("error"):
                gates += [GateResult(n, t, None, False, where, f"not measured: {row['error']}")
                          for n, t in thresholds.items() if n != "max_size_mb"]
                continue
            acc = row.get("accuracy") or {}
            lat = (row.get("latency") or {}).get(str(batch_size)) or {}
            spd = _speedup_for(row, cfg.speedup_vs, batch_size)
            for name, threshold in thresholds.items():
                if name == "max_size_mb":
                    continue
                gates.append(_row_gate(name, threshold, where, acc, lat, spd, row, base_top1, batch_size))
    return gates


def _speedup_for(row: dict[str, Any], vs: str, bs: int) -> dict[str, Any]:
    """The speedup entry a min_speedup gate judges, with `vs` naming what it was measured against."""
    if vs == "original":
        spd = dict((row.get("speedup") or {}).get(str(bs)) or {})
        if spd:
            spd.setdefault("vs", "original@torch")
        return spd
    if vs == "fp32":
        spd = dict((row.get("speedup_fp32") or {}).get(str(bs)) or {})
        return spd or {"missing": f"no FP32 artifact of the same runtime ({row.get('backend')}) was measured"}
    spd = dict(((row.get("speedup_vs") or {}).get(vs) or {}).get(str(bs)) or {})
    if spd:
        return spd
    if row.get("artifact") == vs:
        return {"missing": f"'{vs}' cannot be judged against itself"}
    return {"missing": f"'{vs}' was not measured on {row.get('backend')}"}


def _row_gate(name: str, threshold: float, where: str, acc: dict[str, Any], lat: dict[str, Any],
              spd: dict[str, Any], row: dict[str, Any], base_top1: float | None, bs: int) -> GateResult:
    if name == "max_accuracy_drop":
        top1 = acc.get("top1")
        if top1 is None or base_top1 is None:
            return GateResult(name, threshold, None, False, where, "not measured: eval data has no labels "
                              "(use min_agreement)")
        drop = base_top1 - top1
        return _check(name, threshold, drop, where, f"top-1 {top1:.4f} vs original {base_top1:.4f}")
    if name == "min_agreement":
        value = acc.get("agreement")
        return _check(name, threshold, value, where, "" if value is None else f"{value:.4f} of samples agree")
    if name == "min_speedup":
        if "missing" in spd:
            return GateResult(name, threshold, None, False, where, f"not measured: {spd['missing']}")
        value = spd.get("ratio")
        ci = spd.get("ci95")
        vs = f" vs {spd['vs']}" if spd.get("vs") else ""
        detail = f"batch {bs}{vs}" + (f", 95% CI [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        return _check(name, threshold, value, where, detail)
    if name == "max_latency_ms":
        value = lat.get("p50_ms")
        ci = lat.get("ci95_ms")
        detail = f"p50 at batch {bs}" + (f", 95% CI [{ci[0]:.3f}, {ci[1]:.3f}] ms" if ci else "")
        return _check(name, threshold, value, where, detail)
    if name == "max_peak_memory_mb":
        value = (row.get("memory") or {}).get("rss_delta_mb")
        return _check(name, threshold, value, where, "RSS delta of session load + first batch")
    raise KeyError(name)  # pragma: no cover - thresholds() lists only the names above


def _check(name: str, threshold: float, value: float | None, where: str, detail: str) -> GateResult:
    if value is None:
        return GateResult(name, threshold, None, False, where, f"not measured{': ' + detail if detail else ''}")
    passed = value >= threshold if name.startswith("min_") else value <= threshold
    return GateResult(name, float(threshold), float(value), passed, where, detail)
