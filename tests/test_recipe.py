"""Recipe loading: valid recipes resolve with defaults; every malformed recipe is one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli, main
from pipeline.errors import BadInput
from pipeline.recipe import apply_override, load_recipe

GOOD = textwrap.dedent("""\
    name: t
    model:
      source: builtin:digits_cnn
      input_shape: [1, 1, 32, 32]
    data:
      calibration: {source: builtin, split: calibration}
      eval: {source: builtin, split: test}
    stages:
      - profile: {}
      - export: {}
      - quantize:
          mode: static
      - verify: {}
    """)


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_recipe_resolves_defaults(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.name == "t" and r.threads == 2 and r.seed == 0
    assert [s.kind for s in r.stages] == ["profile", "export", "quantize", "verify"]
    assert r.data.calibration.batch_size == 32
    lock = r.to_dict()
    assert lock["stages"][2]["quantize"]["mode"] == "static"


def test_repeated_stage_kinds_get_unique_ids(tmp_path):
    text = GOOD.replace("  - verify: {}", "  - verify: {}\n  - verify: {}")
    r = load_recipe(write(tmp_path, text))
    assert [s.id for s in r.stages] == ["profile", "export", "quantize", "verify", "verify_2"]


def test_override_sets_stage_key_by_kind_and_index(tmp_path):
    r = load_recipe(write(tmp_path, GOOD), ["stages.quantize.mode=dynamic", "seed=7", "stages[0].batch_size=4"])
    assert r.stages[2].config.mode == "dynamic" and r.seed == 7
    data = {"a": {"b": 1}}
    apply_override(data, "a.c=[1, 2]")
    assert data == {"a": {"b": 1, "c": [1, 2]}}


BAD = [
    # (id, recipe text or transform, expected fragments of the one-line message)
    ("wrong_literal", GOOD.replace("mode: static", "mode: int4"),
     ["r.yaml:12", "stages[2].quantize.mode", "expected 'static' | 'dynamic' | 'fp16'", "got 'int4'"]),
    ("unknown_top_key", GOOD + "colour: blue\n", ["r.yaml:14", "colour", "unknown key"]),
    ("unknown_stage_key", GOOD.replace("mode: static", "mode: static\n      moed: 3"),
     ["r.yaml:13", "stages[2].quantize.moed", "unknown key"]),
    ("unknown_stage", GOOD.replace("- profile: {}", "- profiel: {}"),
     ["r.yaml:9", "stages[0].profiel", "unknown stage 'profiel'", "did you mean 'profile'"]),
    ("wrong_type", GOOD.replace("name: t", "name: t\nseed: abc"), ["r.yaml:2", "seed", "got 'abc'"]),
    ("missing_model", GOOD.replace("model:\n  source: builtin:digits_cnn\n  input_shape: [1, 1, 32, 32]\n", ""),
     ["model", "required key is missing"]),
    ("bad_model_source", GOOD.replace("builtin:digits_cnn", "tensorflow:resnet"),
     ["r.yaml:3", "model.source", "expected 'torchvision:NAME'"]),
    ("bad_data_source", GOOD.replace("{source: builtin, split: calibration}", "{source: s3, split: x}"),
     ["r.yaml:6", "data.calibration", "expected source"]),
    ("empty_file", "", ["recipe is empty"]),
    ("comment_only", "# nothing\n", ["recipe is empty"]),
    ("yaml_syntax", "name: t\nmodel: [1, 2\n", ["r.yaml:", "YAML syntax error"]),
    ("top_level_list", "- a\n- b\n", ["r.yaml:1", "expected a mapping"]),
    ("stage_not_mapping", GOOD.replace("- profile: {}", "- profile"),
     ["r.yaml:9", "stages[0]", "one-key mapping"]),
    ("stage_two_keys", GOOD.replace("- profile: {}", "- {profile: {}, verify: {}}"),
     ["stages[0]", "one-key mapping"]),
    ("no_stages", GOOD.split("stages:")[0] + "stages: []\n", ["stages", "at least 1"]),
    ("negative_threads", GOOD.replace("name: t", "name: t\nthreads: -1"), ["r.yaml:2", "threads", "greater than 0"]),
    ("bad_name", GOOD.replace("name: t", "name: 'a b/c'"), ["r.yaml:1", "name", "pattern"]),
    ("duplicate_key", GOOD.replace("name: t", "name: t\nname: u"), ["r.yaml:2", "name", "duplicate key"]),
    ("bad_input_shape", GOOD.replace("[1, 1, 32, 32]", "[1, -1]"), ["r.yaml:4", "model.input_shape", "positive"]),
    ("unknown_data_key", GOOD.replace("split: test}", "split: test, smaples: 3}"),
     ["r.yaml:7", "data.eval.smaples", "unknown key"]),
    ("wrong_split", GOOD.replace("split: test}", "split: valid}"),
     ["data.eval.split", "expected 'train' | 'calibration' | 'test'"]),
]


@pytest.mark.parametrize("case,text,fragments", BAD, ids=[b[0] for b in BAD])
def test_malformed_recipe_is_one_line_naming_key_and_line(tmp_path, case, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(BadInput) as info:
        load_recipe(path)
    msg = str(info.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_missing_recipe_file(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("item,fragment", [
    ("nokey", "expected KEY=VALUE"),
    ("stages.nostage.x=1", "no stage 'nostage'"),
    ("stages.9.x=1", "out of range"),
    ("seed=[unclosed", "not valid YAML"),
    ("stages.quantize.mode=int4", "expected 'static' | 'dynamic' | 'fp16'"),
])
def test_bad_override(tmp_path, item, fragment):
    with pytest.raises(BadInput, match=fragment.replace("[", r"\[").replace("|", r"\|")):
        load_recipe(write(tmp_path, GOOD), [item])


def test_cli_validate_exit_codes(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["validate", str(write(tmp_path, GOOD))], standalone_mode=False)
    assert ok.exception is None and "ok" in ok.output
    bad = write(tmp_path, GOOD.replace("mode: static", "mode: int4"), "bad.yaml")
    with pytest.raises(SystemExit) as info:
        main(["validate", str(bad)])
    assert info.value.code == 2


def test_bad_recipe_subprocess_has_no_traceback(tmp_path):
    bad = write(tmp_path, GOOD.replace("mode: static", "mode: int4"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "stages[2].quantize.mode" in lines[0]


def test_every_shipped_recipe_validates():
    recipes = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        load_recipe(path)


def test_init_writes_a_valid_recipe(tmp_path):
    out = tmp_path / "starter.yaml"
    with pytest.raises(SystemExit) as info:
        main(["init", "--model", "torchvision:resnet18", "--out", str(out)])
    assert info.value.code == 0
    r = load_recipe(out)
    assert r.model.source == "torchvision:resnet18" and r.model.input_shape == [1, 3, 224, 224]
    with pytest.raises(SystemExit) as again:
        main(["init", "--out", str(out)])
    assert again.value.code == 2  # refuses to overwrite
