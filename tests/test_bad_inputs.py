"""A corpus of bad inputs: every one must end in exit 2 with exactly one `error:` line, no traceback.

Three tables, each case built programmatically:
- RECIPES: malformed recipe texts, checked with `fmap validate`;
- OVERRIDES: bad `--set` items on a valid recipe, checked with `fmap validate` (the error must name
  the override, not a recipe line);
- FILES: bad model/weights/data files and user code, checked with `fmap run` (they are only
  discovered when the inputs load).
"""

from __future__ import annotations

import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.cli import main
from conftest import tiny_factory  # also the model source python:<this module>:tiny_factory

MODULE = __name__



def not_a_module() -> str:
    return "a string"


def raising_factory() -> torch.nn.Module:
    raise RuntimeError("factory exploded")


def exiting_factory() -> torch.nn.Module:
    raise SystemExit(7)


BASE = {
    "name": "bad",
    "model": {"source": f"python:{MODULE}:tiny_factory", "input_shape": [1, 3, 8, 8]},
    "data": {"eval": {"source": "random", "samples": 4}},
    "stages": [{"profile": {}}],
}


def base_text() -> str:
    return yaml.safe_dump(BASE, sort_keys=False)


def with_(path: str, value) -> str:
    """The base recipe with one key (dotted path, ints index lists) set to `value`."""
    import copy

    data = copy.deepcopy(BASE)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    cur = data
    for p in parents:
        cur = cur[p]
    cur[last] = value
    return yaml.safe_dump(data, sort_keys=False)


def without(key: str) -> str:
    data = {k: v for k, v in BASE.items() if k != key}
    return yaml.safe_dump(data, sort_keys=False)


def stage(cfg: dict) -> str:
    return with_("stages", [cfg])


def alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return base_text() + "\n".join(lines) + "\n"


RECIPES: dict[str, str | bytes] = {
    "empty": "",
    "only_comment": "# nothing here\n",
    "top_level_list": "- name: x\n",
    "top_level_scalar": "just a string\n",
    "unclosed_bracket": "name: x\nmodel: {source: builtin:digits_cnn\nstages: []\n",
    "tab_indent": "name: x\nmodel:\n\tsource: builtin:digits_cnn\n",
    "bad_indent": "name: x\n model: 3\n  stages: 1\n",
    "duplicate_top_key": base_text() + "name: again\n",
    "duplicate_nested_key": base_text().replace("input_shape:", "source: builtin:x\n  input_shape:", 1),
    "alias_bomb_9": alias_bomb(9),
    "alias_bomb_7": alias_bomb(7),
    "alias_cycle": "name: x\nmodel: &m {source: builtin:digits_cnn, kwargs: {a: *m}}\nstages: [profile: {}]\n",
    "deep_nesting": "name: x\nmodel: {source: builtin:digits_cnn, kwargs: {a: " + "[" * 2000 + "]" * 2000
                    + "}}\nstages: [profile: {}]\n",
    "python_tag": base_text() + "evil: !!python/object/apply:os.system ['true']\n",
    "unknown_tag": base_text() + "x: !custom 3\n",
    "undefined_alias": base_text() + "x: *nowhere\n",
    "non_utf8": b"name: \xff\xfe\x00bad\n",
    "binary_garbage": bytes(range(256)) * 4,
    "missing_name": without("name"),
    "missing_model": without("model"),
    "missing_stages": without("stages"),
    "empty_stages": with_("stages", []),
    "stages_null": with_("stages", None),
    "stages_mapping": with_("stages", {"profile": {}}),
    "stage_is_string": with_("stages", ["profile"]),
    "stage_two_keys": with_("stages", [{"profile": {}, "prune": {}}]),
    "unknown_stage": with_("stages", [{"prnue": {}}]),
    "unknown_top_key": base_text() + "nmae: typo\n",
    "unknown_model_key": with_("model.sorce", "x"),
    "name_bad_chars": with_("name", "my run!"),
    "name_too_long": with_("name", "x" * 200),
    "name_number": with_("name", 3),
    "name_path": with_("name", "../escape"),
    "seed_string": with_("seed", "abc"),
    "seed_negative": with_("seed", -1),
    "seed_huge": with_("seed", 1180591620717411303424),
    "seed_float": with_("seed", 1.5),
    "seed_inf": base_text() + "seed: .inf\n",
    "threads_zero": with_("threads", 0),
    "threads_huge": with_("threads", 100000),
    "threads_nan": base_text() + "threads: .nan\n",
    "model_null": with_("model", None),
    "model_list": with_("model", ["a"]),
    "source_no_prefix": with_("model.source", "resnet18"),
    "source_unknown_prefix": with_("model.source", "hub:resnet18"),
    "source_python_no_factory": with_("model.source", "python:mymodule"),
    "source_empty_name": with_("model.source", "torchvision:"),
    "input_shape_negative": with_("model.input_shape", [1, 3, -8, 8]),
    "input_shape_zero": with_("model.input_shape", [0, 3, 8, 8]),
    "input_shape_one_dim": with_("model.input_shape", [8]),
    "input_shape_huge": with_("model.input_shape", [1, 1, 100000, 100000]),
    "input_shape_too_many_values": with_("model.input_shape", [256, 3, 1024, 1024]),
    "input_shape_strings": with_("model.input_shape", ["a", "b"]),
    "allow_pickle_string": with_("model.allow_pickle", "maybe"),
    "data_unknown_source": with_("data.eval", {"source": "s3", "path": "x"}),
    "data_not_mapping": with_("data.eval", "random"),
    "data_numpy_missing_path": with_("data.eval", {"source": "numpy"}),
    "data_batch_size_zero": with_("data.eval", {"source": "random", "batch_size": 0}),
    "data_batch_size_huge": with_("data.eval", {"source": "random", "batch_size": 10**9}),
    "data_samples_negative": with_("data.eval", {"source": "random", "samples": -5}),
    "data_std_zero": with_("data.eval", {"source": "numpy", "path": "x.npz", "std": [0.0, 1.0, 1.0]}),
    "data_mean_nan": base_text() + "data2: 1\n".replace("data2: 1\n", "") + "",  # replaced below
    "imagefolder_size_huge": with_("data.eval", {"source": "imagefolder", "path": "x", "size": 100000}),
    "random_shape_huge": with_("data.eval", {"source": "random", "shape": [3, 50000, 50000]}),
    "unknown_split": with_("data.test", {"source": "random"}),
    "prune_amount_above_one": stage({"prune": {"amount": 1.5}}),
    "prune_amount_string": stage({"prune": {"amount": "abc"}}),
    "prune_lr_inf": "name: x\nmodel: {source: builtin:digits_cnn}\nstages:\n  - prune: {finetune: {lr: .inf}}\n",
    "prune_lr_nan": "name: x\nmodel: {source: builtin:digits_cnn}\nstages:\n  - prune: {finetune: {lr: .nan}}\n",
    "prune_unknown_key": stage({"prune": {"amout": 0.3}}),
    "quantize_bad_mode": stage({"quantize": {"mode": "int4"}}),
    "verify_bad_backend": stage({"verify": {"backends": ["cuda"]}}),
    "verify_empty_backends": stage({"verify": {"backends": []}}),
    "verify_batch_zero": stage({"verify": {"latency": {"batch_sizes": [0]}}}),
    "verify_batch_huge": stage({"verify": {"latency": {"batch_sizes": [100000]}}}),
    "verify_iterations_one": stage({"verify": {"latency": {"iterations": 1}}}),
    "verify_warmup_negative": stage({"verify": {"latency": {"warmup": -1}}}),
    "gate_negative_speedup": stage({"verify": {"gates": {"min_speedup": -1}}}),
    "gate_speedup_inf": "name: x\nmodel: {source: builtin:digits_cnn}\nstages:\n  - verify: {gates: {min_speedup: .inf}}\n",
    "gate_agreement_above_one": stage({"verify": {"gates": {"min_agreement": 2}}}),
    "gate_unknown": stage({"verify": {"gates": {"min_sped": 2}}}),
    "gate_apply_to_bad": stage({"verify": {"gates": {"min_speedup": 1, "apply_to": 3}}}),
    "output_dir_parent_escape": with_("output_dir", "../../../../x"),
    "output_dir_absolute": with_("output_dir", "/tmp/fmap-escape"),
    "profile_batch_zero": stage({"profile": {"batch_size": 0}}),
}
RECIPES["data_mean_nan"] = base_text().replace("source: random", "source: numpy\n    path: x.npz\n    mean: [.nan, 0, 0]")


OVERRIDES: dict[str, str] = {
    "no_equals": "seed",
    "empty_key": "=3",
    "empty_segment": "model..source=x",
    "bad_yaml_value": "stages.profile=[1",
    "seed_string": "seed=abc",
    "seed_huge": "seed=1180591620717411303424",
    "seed_inf": "seed=.inf",
    "threads_nan": "threads=.nan",
    "unknown_top_key": "nonsense.key=1",
    "no_such_stage": "stages.prune.amount=0.3",
    "stage_index_out_of_range": "stages[5].x=1",
    "stage_unknown_key": "stages.profile.bogus=1",
    "source_bad": "model.source=foo",
    "input_shape_zero": "model.input_shape=[0,3,8,8]",
    "input_shape_huge": "model.input_shape=[1,1,100000,100000]",
    "input_shape_index_out_of_range": "model.input_shape.9=1",
    "name_empty": "name=",
    "model_scalar": "model=3",
    "stages_scalar": "stages=3",
    "samples_negative": "data.eval.samples=-1",
    "profile_batch_zero": "stages.0.batch_size=0",
    "output_dir_escape": "output_dir=../../../../x",
    "seed_is_not_mapping": "seed.x=1",
    "data_source_unknown": "data.eval.source=s3",
}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return int(info.value.code), capsys.readouterr().err


def assert_one_line_bad_input(code: int, err: str, whole_stderr: bool) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert code == 2, f"exit {code}: {err[-1500:]}"
    assert len(errors) == 1 and lines[-1] == errors[0], err[-1500:]
    if whole_stderr:
        assert len(lines) == 1, err
    assert "internal error" not in errors[0]
    return errors[0]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(RECIPES))
def test_malformed_recipe_is_one_line_exit_2(case, tmp_path, capsys):
    text = RECIPES[case]
    path = tmp_path / "sub" / "recipe.yaml"
    path.parent.mkdir()
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, err = run_cli(["validate", str(path)], capsys)
    line = assert_one_line_bad_input(code, err, whole_stderr=True)
    assert str(path) in line or "output_dir" in line, line  # names the file (or the key)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(OVERRIDES))
def test_bad_override_is_one_line_naming_it(case, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(base_text())
    item = OVERRIDES[case]
    code, err = run_cli(["validate", str(path), "--set", item], capsys)
    line = assert_one_line_bad_input(code, err, whole_stderr=True)
    assert f"--set '{item}'" in line or "output_dir" in line, line


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv", [["recipe-that-does-not-exist.yaml"], ["."]])
def test_missing_or_directory_recipe(argv, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["validate", *argv], capsys)
    assert_one_line_bad_input(code, err, whole_stderr=True)


# -- bad model, weights and data files: found by `fmap run` ----------------------------------------

def _state(model: torch.nn.Module | None = None) -> dict:
    return (model or tiny_factory()).state_dict()


def _nan_state() -> dict:
    sd = _state()
    sd["0.weight"][0, 0, 0, 0] = float("nan")
    return sd


def _inf_state() -> dict:
    sd = _state()
    sd["4.bias"][0] = float("inf")
    return sd


def _write_module(tmp: Path, body: str) -> str:
    name = f"usermod_{abs(hash((str(tmp), body))) % 10**8}"
    (tmp / f"{name}.py").write_text(textwrap.dedent(body))
    return name


def weights_case(make: Callable[[Path], None]) -> Callable[[Path], dict]:
    def build(tmp: Path) -> dict:
        path = tmp / "w.pt"
        make(path)
        return {"model.weights": str(path)}
    return build


def torch_save(obj) -> Callable[[Path], None]:
    return lambda p: torch.save(obj, p)


def truncated_weights(p: Path) -> None:
    torch.save(_state(), p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def module_case(body: str, factory: str = "make") -> Callable[[Path], dict]:
    def build(tmp: Path) -> dict:
        return {"model.source": f"python:{_write_module(tmp, body)}:{factory}"}
    return build


def npz_case(**arrays) -> Callable[[Path], dict]:
    def build(tmp: Path) -> dict:
        path = tmp / "d.npz"
        np.savez(path, **arrays)
        return {"data.eval": {"source": "numpy", "path": str(path)}}
    return build


def raw_data_file(content: bytes, name: str = "d.npz") -> Callable[[Path], dict]:
    def build(tmp: Path) -> dict:
        path = tmp / name
        path.write_bytes(content)
        return {"data.eval": {"source": "numpy", "path": str(path)}}
    return build


def npy_content(tmp: Path) -> dict:
    path = tmp / "d.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.zeros((4, 3, 8, 8), np.float32))
    return {"data.eval": {"source": "numpy", "path": str(path)}}


def zip_not_npz(tmp: Path) -> dict:
    path = tmp / "d.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    return {"data.eval": {"source": "numpy", "path": str(path)}}


def folder_case(make: Callable[[Path], None], **extra) -> Callable[[Path], dict]:
    def build(tmp: Path) -> dict:
        root = tmp / "imgs"
        root.mkdir()
        make(root)
        return {"data.eval": {"source": "imagefolder", "path": str(root), "transform": "none", "size": 8, **extra}}
    return build


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (40, 80, 120)).save(path)


def _classes(n: int, bad: tuple[str, bytes] | None = None) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        for c in range(n):
            _png(root / f"c{c}" / "ok.png")
        if bad is not None:
            (root / "c0" / bad[0]).write_bytes(bad[1])
    return make


def _truncated_png(root: Path) -> None:
    _classes(2)(root)
    good = (root / "c0" / "ok.png").read_bytes()
    (root / "c0" / "a_trunc.png").write_bytes(good[: len(good) // 2])


X = np.zeros((4, 3, 8, 8), np.float32)
Y = np.array([0, 1, 0, 1])

FILES: dict[str, Callable[[Path], dict]] = {
    "weights_missing": lambda tmp: {"model.weights": str(tmp / "nope.pt")},
    "weights_empty": weights_case(lambda p: p.write_bytes(b"")),
    "weights_garbage": weights_case(lambda p: p.write_bytes(bytes(range(256)) * 8)),
    "weights_text": weights_case(lambda p: p.write_text("these are not weights\n")),
    "weights_zip_not_torch": weights_case(lambda p: zipfile.ZipFile(p, "w").close()),
    "weights_truncated": weights_case(truncated_weights),
    "weights_wrong_keys": weights_case(torch_save({"fc.weight": torch.zeros(2, 4)})),
    "weights_wrong_shape": weights_case(torch_save({**_state(), "4.weight": torch.zeros(3, 4)})),
    "weights_nan": weights_case(torch_save(_nan_state())),
    "weights_inf": weights_case(torch_save(_inf_state())),
    "weights_pickled_module": weights_case(torch_save(tiny_factory())),
    "weights_a_list": weights_case(torch_save([1, 2, 3])),
    "weights_a_tensor": weights_case(torch_save(torch.zeros(3))),
    "weights_folder": lambda tmp: {"model.weights": str(tmp)},
    "module_missing": lambda tmp: {"model.source": "python:no_such_module_xyz:make"},
    "module_syntax_error": module_case("def make(:\n    pass\n"),
    "module_raises_on_import": module_case("raise RuntimeError('boom at import')\n"),
    "module_sys_exit_on_import": module_case("import sys\nsys.exit(7)\n"),
    "module_imports_missing_dep": module_case("import no_such_dependency_xyz\n"),
    "module_no_factory": module_case("x = 1\n", factory="make"),
    "module_factory_not_callable": module_case("make = 3\n"),
    "factory_raises": lambda tmp: {"model.source": f"python:{MODULE}:raising_factory"},
    "factory_sys_exit": lambda tmp: {"model.source": f"python:{MODULE}:exiting_factory"},
    "factory_returns_string": lambda tmp: {"model.source": f"python:{MODULE}:not_a_module"},
    "factory_bad_kwargs": lambda tmp: {"model.kwargs": {"depth": 3}},
    "model_wrong_channels": lambda tmp: {"model.input_shape": [1, 5, 8, 8]},
    "torchvision_unknown": lambda tmp: {"model.source": "torchvision:resnet19000"},
    "builtin_unknown": lambda tmp: {"model.source": "builtin:nope"},
    "npz_missing": lambda tmp: {"data.eval": {"source": "numpy", "path": str(tmp / "nope.npz")}},
    "npz_empty_file": raw_data_file(b""),
    "npz_garbage": raw_data_file(bytes(range(256)) * 8),
    "npz_text": raw_data_file(b"x,y\n1,2\n"),
    "npz_is_npy": npy_content,
    "npz_zip_without_arrays": zip_not_npz,
    "npz_no_arrays": npz_case(),
    "npz_missing_x": npz_case(images=X, y=Y),
    "npz_zero_samples": npz_case(x=np.zeros((0, 3, 8, 8), np.float32), y=np.zeros(0, np.int64)),
    "npz_length_mismatch": npz_case(x=X, y=np.array([0, 1, 0])),
    "npz_nan": npz_case(x=np.full((4, 3, 8, 8), np.nan, np.float32), y=Y),
    "npz_inf": npz_case(x=np.where(np.arange(768).reshape(4, 3, 8, 8) == 5, np.inf, 0).astype(np.float32), y=Y),
    "npz_string_x": npz_case(x=np.array(["a", "b", "c", "d"]), y=Y),
    "npz_object_x": npz_case(x=np.array([{"a": 1}] * 4, dtype=object), y=Y),
    "npz_one_dim_x": npz_case(x=np.zeros(4, np.float32), y=Y),
    "npz_y_two_dims": npz_case(x=X, y=Y.reshape(2, 2)),
    "npz_y_fractional": npz_case(x=X, y=np.array([0.5, 1, 0, 1])),
    "npz_y_negative": npz_case(x=X, y=np.array([0, -1, 0, 1])),
    "npz_labels_beyond_classes": npz_case(x=X, y=np.array([0, 1, 5, 1])),
    "npz_wrong_sample_shape": npz_case(x=np.zeros((4, 3, 9, 9), np.float32), y=Y),
    "npz_path_is_folder": lambda tmp: {"data.eval": {"source": "numpy", "path": str(tmp)}},
    "npz_explicit_y_key_missing": lambda tmp: {**npz_case(x=X, y=Y)(tmp), "data.eval.y_key": "labels"},
    "npz_mean_wrong_length": lambda tmp: {**npz_case(x=X, y=Y)(tmp), "data.eval.mean": [0.5, 0.5],
                                          "data.eval.std": [1.0, 1.0]},
    "npz_mean_without_std": lambda tmp: {**npz_case(x=X, y=Y)(tmp), "data.eval.mean": [0.5]},
    "folder_is_a_file": lambda tmp: {"data.eval": {"source": "imagefolder", "path": str(Path(__file__))}},
    "folder_std_wrong_length": folder_case(_classes(2), mean=[0.5, 0.5], std=[1.0, 1.0]),
    "folder_image_too_small_for_model": folder_case(_classes(2), size=1),
    "model_input_three_dims": lambda tmp: {"model.input_shape": [1, 3, 8]},
    "folder_missing": lambda tmp: {"data.eval": {"source": "imagefolder", "path": str(tmp / "nope")}},
    "folder_no_classes": folder_case(lambda root: None),
    "folder_no_images": folder_case(lambda root: (root / "c0").mkdir()),
    "folder_corrupt_jpeg": folder_case(_classes(2, ("a_bad.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"))),
    "folder_text_as_png": folder_case(_classes(2, ("a_bad.png", b"hello, I am text"))),
    "folder_empty_png": folder_case(_classes(2, ("a_empty.png", b""))),
    "folder_truncated_png": folder_case(_truncated_png),
    "folder_more_classes_than_outputs": folder_case(_classes(3)),
}


def _apply(data: dict, changes: dict) -> dict:
    import copy

    data = copy.deepcopy(data)
    for key, value in changes.items():
        *parents, last = key.split(".")
        cur = data
        for p in parents:
            cur = cur.setdefault(p, {})
        cur[last] = value
    return data


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(FILES))
def test_bad_file_or_user_code_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = _apply(BASE, FILES[case](tmp_path))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, err = run_cli(["run", str(path), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_bad_input(code, err, whole_stderr=False)
    # nothing half-done: the manifest (when the run got that far) says failed
    manifest = tmp_path / "out" / "manifest.json"
    if manifest.exists():
        import json

        assert json.loads(manifest.read_text())["status"] == "failed"


def test_corpus_is_big_enough():
    assert len(RECIPES) + len(OVERRIDES) >= 80
    assert len(FILES) >= 30


QUICKSTART_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
HOSTILE_VALUES = ["abc", "-1", ".inf", ".nan", "[]", "{}", "null", "1e30", "99999999999999999999999", "[[1]]", "0"]


def _key_paths(obj, prefix: tuple = ()) -> list[str]:
    """Every key path of a resolved recipe, stages addressed by position (stages.3.mode)."""
    out = [".".join(map(str, prefix))] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _key_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            inner = next(iter(v.values())) if prefix == ("stages",) and isinstance(v, dict) and len(v) == 1 else v
            out += _key_paths(inner, (*prefix, i))
    return out


HOSTILE_PER_KEY = 4  # values per key in the default suite (every value still meets ~50 keys)


def _hostile_overrides(per_key: int) -> list[str]:
    """`key=value` for every key of the resolved quickstart recipe and `per_key` hostile values,
    rotated so that neighbouring keys get different ones."""
    from pipeline.recipe import load_recipe

    keys = sorted(set(_key_paths(load_recipe(QUICKSTART_RECIPE).to_dict())))
    assert len(keys) > 50
    n = len(HOSTILE_VALUES)
    return [f"{key}={HOSTILE_VALUES[(i + j * 3) % n]}" for i, key in enumerate(keys) for j in range(min(per_key, n))]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("per_key", [pytest.param(HOSTILE_PER_KEY, id="rotated"),
                                     pytest.param(len(HOSTILE_VALUES), id="all", marks=pytest.mark.slow)])
def test_hostile_override_of_every_quickstart_key_is_accepted_or_one_line(per_key, capsys):
    """Every key, hostile values: each override validates or is exit 2 with one line naming it.
    The default suite gives each key 4 of the 11 values (~560 runs, a quarter of the time);
    `make test-slow` every pair (~1,500)."""
    items = _hostile_overrides(per_key)
    assert {item.partition("=")[2] for item in items} == set(HOSTILE_VALUES)
    for item in items:
        code, err = run_cli(["validate", str(QUICKSTART_RECIPE), "--set", item], capsys)
        if code == 0:
            continue
        line = assert_one_line_bad_input(code, err, whole_stderr=True)
        assert f"--set '{item}'" in line, line
