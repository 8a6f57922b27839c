"""Shared prefixes: the stage cache (`fmap run --stage-cache`) and the sweep's prefix waves."""

from __future__ import annotations

import json
from pathlib import Path

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
