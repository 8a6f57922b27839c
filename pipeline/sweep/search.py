"""`--search optuna`: the sweep asks Optuna for its trials instead of taking a grid's product.

Sampler: TPE, also for several objectives (Optuna's multi-objective TPE). Optuna's own default for
several objectives is NSGA-II, whose first generation is `population_size` (50) random trials, so
a sweep of the usual 10-40 expensive trials would be pure random search; TPE models the results
after `n_startup_trials` random ones (here min(10, max(1, trials // 3))). Constraints go to TPE as
violation amounts (<= 0 feasible), so it prefers points that keep them.

Seeded and resumable without an Optuna database: trials are asked in batches of `--workers`, and
batch k is asked from a fresh study whose sampler is seeded with seed + k and which holds every
earlier ask with its result read back from the trial's run directory. A batch is therefore a pure
function of (seed, earlier results), and a killed sweep, run again, asks the same points, finds
their run directories finished and goes on from where it stopped.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.errors import BadInput
from pipeline.sweep import grid as gridmod
from pipeline.sweep import objectives as objmod

KINDS = ("float", "int", "choice")


@dataclass(frozen=True)
class Param:
    """One searched key: `KEY=float:LO:HI[:log]`, `KEY=int:LO:HI[:log]` or `KEY=choice:A,B,C`."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[str, ...] = ()  # raw YAML text of each choice

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "float":
            return FloatDistribution(self.low, self.high, log=self.log)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return CategoricalDistribution(list(self.choices))

    def texts(self) -> list[str]:
        """The values that bound the range (validated against the recipe before any trial)."""
        if self.kind == "choice":
            return list(self.choices)
        return [_text(self, self.low), _text(self, self.high)]

    def __str__(self) -> str:
        if self.kind == "choice":
            return f"{self.key}=choice:{','.join(self.choices)}"
        return f"{self.key}={self.kind}:{self.low:g}:{self.high:g}{':log' if self.log else ''}"


def _text(p: Param, value: Any) -> str:
    if p.kind == "int":
        return str(int(value))
    if p.kind == "float":
        return repr(float(value))
    return str(value)


def _number(item: str, text: str, integer: bool) -> float:
    try:
        return float(int(text)) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise BadInput(f"--param '{item}': '{text}' is not {kind}") from None


def parse_param(item: str) -> Param:
    """Parse one `--param`; BadInput (exit 2) on a bad kind, bound or empty choice list."""
    key, sep, spec = item.partition("=")
    key = key.strip()
    kind, _, rest = spec.partition(":")
    if not sep or not key or kind not in KINDS:
        raise BadInput(f"--param '{item}': expected KEY=float:LO:HI[:log], KEY=int:LO:HI[:log] or KEY=choice:A,B,C")
    if kind == "choice":
        return Param(key, kind, choices=gridmod.parse_values(rest, f"--param '{item}'", "choice"))
    parts = rest.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise BadInput(f"--param '{item}': expected {kind}:LO:HI or {kind}:LO:HI:log")
    low, high = (_number(item, t.strip(), kind == "int") for t in parts[:2])
    log = len(parts) == 3
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise BadInput(f"--param '{item}': need LO < HI, got {low:g} and {high:g}")
    if log and low <= 0:
        raise BadInput(f"--param '{item}': a log range needs LO > 0")
    return Param(key, kind, low, high, log)


def parse_params(items: tuple[str, ...] | list[str]) -> list[Param]:
    params = [parse_param(i) for i in items]
    keys = [p.key for p in params]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise BadInput(f"--param '{dup}' is given twice")
    if not params:
        raise BadInput("--search optuna needs at least one --param KEY=float:LO:HI (or int:, choice:)")
    return params


def require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise BadInput("--search optuna: Optuna is not installed (pip install 'fmap[optuna]')") from None


@dataclass
class OptunaSearch:
    params: list[Param]
    objectives: list[objmod.Objective]
    constraints: list[objmod.Constraint]
    trials: int
    seed: int = 0

    @property
    def startup_trials(self) -> int:
        return min(10, max(1, self.trials // 3))

    def describe(self) -> dict[str, Any]:
        return {"strategy": "optuna", "sampler": "TPESampler", "trials": self.trials, "seed": self.seed,
                "n_startup_trials": self.startup_trials, "params": [str(p) for p in self.params]}

    def ask(self, history: list[tuple[gridmod.Trial, dict[str, Any] | None]], n: int, batch: int,
            base_overrides: tuple[str, ...]) -> list[gridmod.Trial]:
        """The next `n` trials, given every earlier ask and its leaderboard row (None: no result)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():  # constraints_func is "experimental" in Optuna 4.5 (pinned)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=self.seed + batch, n_startup_trials=self.startup_trials,
                                                 constraints_func=_constraints_of if self.constraints else None)
        study = optuna.create_study(directions=[o.direction + "imize" for o in self.objectives], sampler=sampler)
        dists = {p.key: p.distribution() for p in self.params}
        for trial, row in history:
            study.add_trial(self._frozen(trial, row, dists))
        out = []
        for _ in range(n):
            asked = study.ask(dists)
            values = {p.key: asked.params[p.key] for p in self.params}
            items = tuple(f"{p.key}={_text(p, values[p.key])}" for p in self.params)
            params = {p.key: yaml.safe_load(_text(p, values[p.key])) for p in self.params}
            out.append(gridmod.Trial(gridmod.trial_id(items), params, base_overrides + items))
        return out

    def _frozen(self, trial: gridmod.Trial, row: dict[str, Any] | None, dists: dict[str, Any]) -> Any:
        from optuna.samplers._base import _CONSTRAINTS_KEY
        from optuna.trial import TrialState, create_trial

        params = {p.key: _choice_text(p, trial.params[p.key]) if p.kind == "choice" else trial.params[p.key]
                  for p in self.params}
        vals = [row["objectives"].get(o.name) if row else None for o in self.objectives]
        if row is None or row["status"] not in ("ok", "gate_failed") or any(v is None for v in vals):
            return create_trial(state=TrialState.FAIL, params=params, distributions=dists)
        attrs = {_CONSTRAINTS_KEY: [violation(c, row["objectives"].get(c.name)) for c in self.constraints]}
        return create_trial(values=vals, params=params, distributions=dists, system_attrs=attrs)


def _choice_text(p: Param, value: Any) -> str:
    """The choice whose YAML is `value` (params hold parsed values, Optuna the raw texts)."""
    return next(c for c in p.choices if yaml.safe_load(c) == value)


def _constraints_of(frozen: Any) -> list[float]:
    from optuna.samplers._base import _CONSTRAINTS_KEY

    return list(frozen.system_attrs.get(_CONSTRAINTS_KEY, []))


def violation(c: objmod.Constraint, value: float | None) -> float:
    """How far a value is from meeting a constraint: <= 0 when it holds (Optuna's convention)."""
    if value is None:
        return 1.0
    if c.holds(value):
        return 0.0
    gap = abs(value - c.bound)
    return max(gap, 1e-9)
