"""Shared prefixes: which stages of which trials to run first, once, so the other trials reuse them.

Trials whose recipes agree up to a stage have the same chain hash there (pipeline.fingerprint, the
hash `--resume` uses), and every trial runs with `--stage-cache DIR/cache` (pipeline.stagecache), so
a stage finished by one trial is copied, not recomputed, by the others. Left alone, parallel
workers would still compute a shared stage once per worker, before any of them published it. So
before the build phase the sweep runs, wave by wave, one task per *branch point* of the trials'
chains: the deepest stage that a set of two or more trials shares before their chains part. Wave 1
holds the branch points no other branch point precedes, wave 2 those after them, and so on; a
grid that varies only quantize settings has one branch point (export) and runs
profile/prune/export once, in one task.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Prefix:
    trial_id: str  # the trial whose run directory computes it (the first trial sharing it)
    stages: int  # how many leading stages
    chain_hash: str  # the last of them's hash: its key in the stage cache


def waves(chains: dict[str, list[str]]) -> list[list[Prefix]]:
    """Branch points of the trials' stage chains ({trial id: chain hashes}, in trial order), by wave."""
    holders: dict[str, set[str]] = defaultdict(set)
    for tid, chain in chains.items():
        for h in chain:
            holders[h].add(tid)
    found: dict[str, tuple[int, Prefix]] = {}
    for tid, chain in chains.items():
        level = 0
        for d, h in enumerate(chain):
            if len(holders[h]) < 2:
                break
            after = holders[chain[d + 1]] if d + 1 < len(chain) else set()
            if after != holders[h]:  # the trials sharing this stage part after it (or it is the last)
                found.setdefault(h, (level, Prefix(tid, d + 1, h)))
                level += 1
    out: list[list[Prefix]] = []
    for level, prefix in found.values():
        while len(out) <= level:
            out.append([])
        out[level].append(prefix)
    return out
