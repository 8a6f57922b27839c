"""Shared prefixes: the stage cache (`fmap run --stage-cache`) and the sweep's prefix waves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.fingerprint import sha256_file, stage_chain
from pipeline.recipe import load_recipe
from pipeline.runner import run_recipe
from pipeline.sweep.prefixes import Prefix, waves

def _stages(run_dir: Path) -> dict[str, dict]:
    return {s["id"]: s for s in json.loads((run_dir / "manifest.json").read_text())["stages"]}


def test_runs_that_agree_up_to_a_stage_reuse_it(tiny_recipe, tmp_path):
    path = tiny_recipe
    cache = tmp_path / "cache"
    a = run_recipe(load_recipe(path), out=tmp_path / "a", stage_cache=cache)
    b = run_recipe(load_recipe(path, ["stages.quantize.mode=dynamic"]), out=tmp_path / "b", stage_cache=cache)
    assert a.exit_code == 0 and b.exit_code == 0
    sa, sb = _stages(tmp_path / "a"), _stages(tmp_path / "b")
    assert sa["export"]["reused"] is None and sb["export"]["reused"]["run_dir"] == str(tmp_path / "a")
    assert sb["export"]["chain_hash"] == sa["export"]["chain_hash"] == sb["export"]["reused"]["chain_hash"]
    assert sb["quantize"]["reused"] is None  # its config differs: computed
    assert sb["quantize"]["artifacts"] != sa["quantize"]["artifacts"]
    fp32 = sa["export"]["artifacts"]["onnx_fp32"]["path"]
    assert sha256_file(tmp_path / "b" / fp32) == sha256_file(tmp_path / "a" / fp32)  # the same bytes
    assert sb["export"]["artifacts"] == sa["export"]["artifacts"] and sb["export"]["metrics"] == sa["export"]["metrics"]
    assert [s["chain_hash"] for s in sb.values()] == stage_chain(load_recipe(path, ["stages.quantize.mode=dynamic"]))

    # a cache entry whose file no longer matches its sha256 is not trusted: the stage runs again
    entry = cache / sa["export"]["chain_hash"] / "files" / fp32
    entry.write_bytes(b"not an onnx file")
    c = run_recipe(load_recipe(path, ["stages.quantize.per_channel=false"]), out=tmp_path / "c", stage_cache=cache)
    assert c.exit_code == 0 and _stages(tmp_path / "c")["export"]["reused"] is None
    assert sha256_file(tmp_path / "c" / fp32) == sha256_file(tmp_path / "a" / fp32)


def test_prefix_waves_are_the_branch_points():
    # 4 trials: a and b share stages 1-2, c shares stage 1 with them, d shares nothing
    chains = {"a": ["p", "x", "qa"], "b": ["p", "x", "qb"], "c": ["p", "y", "qc"], "d": ["o", "z", "qd"]}
    assert waves(chains) == [[Prefix("a", 1, "p")], [Prefix("a", 2, "x")]]
    # a grid that varies only the last stage: one task, all shared stages at once
    assert waves({"a": ["p", "x", "1"], "b": ["p", "x", "2"], "c": ["p", "x", "3"]}) == [[Prefix("a", 2, "x")]]
    assert waves({"a": ["p"], "b": ["o"]}) == []
    # identical build prefixes (the trials differ only after verify): the whole prefix once
    assert waves({"a": ["p", "x"], "b": ["p", "x"]}) == [[Prefix("a", 2, "x")]]


def test_a_claimed_stage_is_waited_for_then_reused(tmp_path):
    """Two runs reaching the same stage at once: the second waits for the first's claim and, once the
    stage is published, gets None (reuse it) instead of computing it again."""
    import threading

    from pipeline import stagecache

    cache, chain = tmp_path / "cache", "c" * 64
    mine = stagecache.claim(cache, chain)
    assert mine is not None and int(mine.path.read_text()) == os.getpid()
    waited: list[str] = []
    got: list[Path | None] = []
    other = threading.Thread(target=lambda: got.append(stagecache.claim(cache, chain, waited.append)))
    other.start()
    other.join(timeout=1.0)
    assert other.is_alive() and waited == [f"pid {os.getpid()}"]  # still waiting
    (cache / chain).mkdir()
    (cache / chain / stagecache.ENTRY).write_text("{}")  # what publish() leaves
    stagecache.release(mine)
    other.join(timeout=5.0)
    assert not other.is_alive() and got == [None]


def test_a_claim_whose_run_died_is_taken_over(tmp_path):
    import subprocess
    import sys

    from pipeline import stagecache

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cache, chain = tmp_path / "cache", "d" * 64
    cache.mkdir()
    stale = cache / f".{chain}.claim"
    stale.write_text(f"{int(dead.stdout)}\n")  # what a killed run leaves: the file, no lock
    mine = stagecache.claim(cache, chain, lambda owner: pytest.fail(f"waited for a dead run: {owner}"))
    assert mine is not None and mine.path == stale and int(stale.read_text()) == os.getpid()
    stagecache.release(mine)
    assert not stale.exists()
