"""What a sweep will run, fully validated before any trial starts (built by driver.plan_sweep,
read by the driver and the report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.recipe import Recipe
from pipeline.sweep import grid as gridmod
from pipeline.sweep import objectives as objmod
from pipeline.sweep.executors import Executor

if TYPE_CHECKING:
    from pipeline.sweep.search import OptunaSearch


@dataclass
class SweepPlan:
    recipe_path: Path
    out: Path
    grids: list[gridmod.Grid]
    overrides: tuple[str, ...]
    trials: list[gridmod.Trial]
    recipes: dict[str, Recipe]  # trial id -> the validated recipe with its overrides
    objectives: list[objmod.Objective]
    constraints: list[objmod.Constraint]
    backend: str | None
    workers: int
    threads_per_worker: int
    executor: Executor
    executor_address: str | None = None
    retry_failed: bool = False
    search: OptunaSearch | None = None  # None: the grid's trials; else trials are asked batch by batch
    base: Recipe | None = None  # the recipe with the sweep-wide overrides (what every trial shares)
    share_prefixes: bool = True  # trials reuse each other's stages through OUT/cache (prefixes.py)
    exact: bool = False  # every phase on its recipe's own threads: each trial is its single `fmap run`
    requested_workers: int | None = None  # --workers (or its default) before exact mode capped it
    notes: list[str] = field(default_factory=list)  # lines the driver prints before any trial

    def threads_of(self, recipe: Recipe) -> int:
        """Threads of one trial's phases: exact, its recipe's own; else the per-worker share."""
        return recipe.threads if self.exact else self.threads_per_worker

    @property
    def parallel_timed(self) -> bool:
        """Several trials at once, and latency to measure."""
        recipe = self.base or next(iter(self.recipes.values()))
        many = len(self.trials) > 1 or (self.search is not None and self.search.trials > 1)
        return self.workers > 1 and many and verify_index(recipe) > 0

    @property
    def quiet_timing(self) -> bool:
        """Each trial one `fmap run` that pauses the others while it measures latency (pipeline.quiet):
        exact local sweeps, where the recipe's threads are the trial's threads throughout."""
        return self.parallel_timed and self.exact and self.executor.name == "local"

    @property
    def two_phase(self) -> bool:
        """A parallel build phase, then a serial timing phase (Ray: trials elsewhere cannot be paused;
        --no-exact: the build ran on other threads than the timing)."""
        return self.parallel_timed and not self.quiet_timing


def verify_index(recipe: Recipe) -> int:
    """Index of the first verify stage (-1 when there is none)."""
    return next((s.index for s in recipe.stages if s.kind == "verify"), -1)
