"""imagefolder `split:`: one labelled folder divided into disjoint, stratified, seeded parts."""

from __future__ import annotations

import pytest

from pipeline.errors import BadInput
from pipeline.recipe import parse_recipe
from pipeline.recipe_models import ImageFolderData
from pipeline.sources.data import build_split, stratified_part
from tests.test_journeys import make_folder

FRACTIONS = {"calibration": 0.25, "eval": 0.5, "train": 0.25}


def test_parts_are_disjoint_stratified_and_cover_the_folder(tmp_path):
    folder = make_folder(tmp_path, per_class=12, size=8)
    parts = {}
    for name in FRACTIONS:
        cfg = ImageFolderData(source="imagefolder", path=str(folder), transform="none", split=FRACTIONS)
        parts[name] = build_split(cfg, name, [1, 3, 8, 8], seed=0).files
    paths = {name: {f for f, _ in files} for name, files in parts.items()}
    assert not (paths["calibration"] & paths["eval"]) and not (paths["eval"] & paths["train"])
    assert not (paths["calibration"] & paths["train"])
    assert sum(len(p) for p in paths.values()) == 36
    for name, files in parts.items():  # every class gets its fraction of 12
        counts = {label: sum(1 for _, y in files if y == label) for label in range(3)}
        assert counts == {label: round(12 * FRACTIONS[name]) for label in range(3)}, (name, counts)


def test_split_is_seeded():
    files = [(f"c{c}/{i}.png", c) for c in range(2) for i in range(20)]
    a = stratified_part(files, {"calibration": 0.5, "eval": 0.5}, "eval", seed=0)
    assert a == stratified_part(list(reversed(files)), {"calibration": 0.5, "eval": 0.5}, "eval", seed=0)
    assert a != stratified_part(files, {"calibration": 0.5, "eval": 0.5}, "eval", seed=1)


RECIPE = """\
name: t
model: {{source: builtin:digits_cnn}}
data:
  calibration: {{source: imagefolder, path: imgs{a}}}
  eval: {{source: imagefolder, path: imgs{b}}}
stages: [profile: {{}}]
"""


@pytest.mark.parametrize("a,b,fragment", [
    ("", "", "calibration and eval read the same folder 'imgs' and would overlap"),
    (", split: {calibration: 0.5, eval: 0.5}", "", "would overlap"),
    (", split: {calibration: 0.2, eval: 0.8}", ", split: {calibration: 0.3, eval: 0.7}", "different split fractions"),
    (", split: {calibration: 0.5, eval: 0.6}", ", split: {calibration: 0.5, eval: 0.6}", "add up to 1.1"),
    (", split: {eval: 0.5}", ", split: {eval: 0.5}", "calibration.split has no 'calibration' fraction"),
])
def test_overlapping_or_inconsistent_splits_are_refused_in_one_line(a, b, fragment):
    with pytest.raises(BadInput, match=fragment) as info:
        parse_recipe(RECIPE.format(a=a, b=b))
    assert "\n" not in str(info.value) and "got {" not in str(info.value)


def test_same_split_on_both_validates():
    split = ", split: {calibration: 0.5, eval: 0.5}"
    recipe = parse_recipe(RECIPE.format(a=split, b=split))
    assert recipe.data.eval.split == {"calibration": 0.5, "eval": 0.5}


def test_take_cuts_the_stream_at_n_samples():
    import torch

    from pipeline.sources.data import TensorSplit

    split = TensorSplit("s", torch.arange(10.0).reshape(10, 1), torch.arange(10), batch_size=4)
    got = list(split.take(6))
    assert [len(x) for x, _ in got] == [4, 2] and got[1][1].tolist() == [4, 5]
    assert sum(len(x) for x, _ in split.take(None)) == 10 and list(split.take(0)) == []
