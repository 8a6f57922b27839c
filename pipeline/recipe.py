"""Load and validate a recipe: YAML (safe_load only) -> pydantic models -> a frozen `Recipe`.

Every error is one line naming the file, the line, the key path and what was expected, e.g.
`recipes/x.yaml:12 stages[2].quantize.mode: expected 'static' | 'dynamic' | 'fp16', got 'int4'`,
raised as `BadInput` (exit code 2). Stages are written as one-key mappings (`- prune: {...}`); the
key selects the stage's own config model, so each stage kind validates its own keys.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from pipeline.errors import BadInput
from pipeline.plugins import load_plugins
from pipeline.recipe_models import DataConfig, ModelConfig, Strict
from pipeline.contracts import StageConfig


class RecipeHeader(Strict):
    """Everything but the stages (validated separately, per stage kind)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)  # what torch, numpy and random all accept
    threads: int = Field(default=2, gt=0, le=256)
    output_dir: str | None = None  # default: runs/ under the working directory
    plugins: list[str] = Field(default_factory=list)  # plug-in files (beside the recipe) or modules
    model: ModelConfig
    data: DataConfig = DataConfig()
    stages: list[Any] = Field(min_length=1)


@dataclass(frozen=True)
class StageSpec:
    """One entry of `stages:`: its kind, a unique id (`export`, `export_2`, ...) and its config."""

    kind: str
    id: str
    index: int
    config: StageConfig

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: self.config.model_dump(mode="json", by_alias=True)}


@dataclass(frozen=True)
class Recipe:
    name: str
    seed: int
    threads: int
    output_dir: str
    model: ModelConfig
    data: DataConfig
    stages: tuple[StageSpec, ...]
    source_path: Path | None = None

    output_dir_explicit: bool = False
    plugins: tuple[str, ...] = ()

    def run_dir(self, out: str | Path | None = None) -> Path:
        """`--out` wins; an explicit `output_dir` is relative to the recipe's folder and must stay
        inside it (a shared recipe must not write anywhere it likes); else `runs/<name>`."""
        if out is not None:
            return Path(out)
        if not self.output_dir_explicit:
            return Path(self.output_dir) / self.name
        base = self.source_path.parent if self.source_path is not None else Path(".")
        target = base / self.output_dir
        inside = not Path(self.output_dir).is_absolute()
        if inside:
            try:
                target.resolve().relative_to(base.resolve())
            except ValueError:
                inside = False
        if not inside:
            raise BadInput(f"output_dir '{self.output_dir}' is outside the recipe's folder {base}; "
                           "use a path inside it, or choose the run directory with --out")
        return target / self.name

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe, defaults included: what recipe.lock.yaml records."""
        return {
            "name": self.name,
            "seed": self.seed,
            "threads": self.threads,
            "output_dir": self.output_dir,
            **({"plugins": list(self.plugins)} if self.plugins else {}),
            "model": self.model.model_dump(mode="json"),
            "data": self.data.model_dump(mode="json", exclude_none=True),
            "stages": [s.to_dict() for s in self.stages],
        }

    def hash_material(self) -> str:
        """Stable JSON of what determines the run's inputs (model, data, seed)."""
        return json.dumps({"model": self.to_dict()["model"], "data": self.to_dict()["data"], "seed": self.seed},
                          sort_keys=True)


# --------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file. Raises BadInput with a one-line message."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"recipe '{path}' does not exist")
    if not path.is_file():
        raise BadInput(f"recipe '{path}' is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"recipe '{path}' cannot be read: {exc}") from None
    return parse_recipe(text, str(path), overrides, source_path=path)


def parse_recipe(text: str, filename: str = "<recipe>", overrides: list[str] | tuple[str, ...] = (),
                 source_path: Path | None = None) -> Recipe:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_size(node, filename)  # before anything walks the expanded tree
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BadInput(f"{filename}{line}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise BadInput(f"{filename}: YAML nested too deeply (more than {MAX_YAML_DEPTH} levels)") from None
    if data is None:
        raise BadInput(f"{filename}: recipe is empty (expected a mapping with name, model and stages)")
    if not isinstance(data, dict):
        raise BadInput(f"{filename}:1: expected a mapping with name, model and stages at the top, got {type(data).__name__}")
    _check_duplicate_keys(node, filename)
    applied = [(item, apply_override(data, item)) for item in overrides]
    return _validate(data, node, filename, source_path, applied)


Applied = list[tuple[str, tuple[Any, ...]]]  # (--set item, the data path it wrote)


def _validate(data: dict[str, Any], node: yaml.Node | None, filename: str, source_path: Path | None,
              applied: Applied | None = None) -> Recipe:
    from pipeline.stages import STAGES, get_stage  # lazy: no recipe -> stages -> recipe cycle

    ov = applied or []
    plugins = data.get("plugins")  # first: the model source and stage configs may name what they register
    if isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):  # else the header says why
        load_plugins(plugins, source_path.parent if source_path is not None else None)
    try:
        header = RecipeHeader.model_validate(data)
    except ValidationError as exc:
        raise _format_error(exc, data, node, filename, prefix=(), applied=ov) from None
    specs: list[StageSpec] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(header.stages):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise _error(filename, node, data, ("stages", i),
                         "expected a one-key mapping such as '- profile: {}' naming the stage", applied=ov)
        kind, raw_cfg = next(iter(entry.items()))
        if kind not in STAGES:
            raise _error(filename, node, data, ("stages", i, kind),
                         f"unknown stage '{kind}' (expected {' | '.join(repr(k) for k in STAGES)}){_did_you_mean(str(kind), list(STAGES))}",
                         on_key=True, applied=ov)
        stage_cls = get_stage(kind)
        try:
            cfg = stage_cls.Config.model_validate({} if raw_cfg is None else raw_cfg)
        except ValidationError as exc:
            raise _format_error(exc, data, node, filename, prefix=("stages", i, kind), applied=ov) from None
        seen[kind] = seen.get(kind, 0) + 1
        stage_id = kind if seen[kind] == 1 else f"{kind}_{seen[kind]}"
        specs.append(StageSpec(kind=kind, id=stage_id, index=i, config=cfg))
    _check_order(specs, filename, node, data)
    return Recipe(name=header.name, seed=header.seed, threads=header.threads,
                  output_dir=header.output_dir if header.output_dir is not None else "runs",
                  model=header.model, data=header.data, stages=tuple(specs), source_path=source_path,
                  output_dir_explicit=header.output_dir is not None, plugins=tuple(header.plugins))


def _check_order(specs: list[StageSpec], filename: str, node: yaml.Node | None, data: dict[str, Any]) -> None:
    """Each stage's `requires` must be `produces`d by an earlier stage: a quantize before any ONNX
    exists is an error here, naming the stage that would make it, not an implicit export at run time."""
    from pipeline.stages import STAGES, get_stage  # lazy: no recipe -> stages -> recipe cycle

    made: set[str] = set()
    for spec in specs:
        stage = get_stage(spec.kind)()
        missing = [a for a in stage.requires(spec.config) if a not in made]
        if missing:
            makers = [k for k in STAGES if missing[0] in get_stage(k)().produces(get_stage(k).Config())]
            hint = f"; put '- {makers[0]}: {{}}' before it" if makers else ""
            raise _error(filename, node, data, ("stages", spec.index, spec.kind),
                         f"needs the artifact '{missing[0]}', which no earlier stage produces{hint}",
                         on_key=True)
        made.update(stage.produces(spec.config))


# --------------------------------------------------------------------------------------------
# Overrides: --set a.b=c


_INDEX = re.compile(r"^(?P<key>[^\[\]]*)\[(?P<idx>\d+)\]$")


def apply_override(data: dict[str, Any], item: str) -> tuple[Any, ...]:
    """Apply `a.b.c=value` (value parsed as YAML) in place; return the data path it wrote.

    `stages.prune.amount=0.3` addresses the first stage of kind prune; `stages[1].amount` or
    `stages.1.amount` the second stage by position.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise BadInput(f"--set '{item}': expected KEY=VALUE, e.g. --set stages.prune.amount=0.3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise BadInput(f"--set '{item}': value '{raw}' is not valid YAML") from None
    parts: list[str | int] = []
    for part in key.strip().split("."):
        m = _INDEX.match(part)
        if m:
            if m["key"]:
                parts.append(m["key"])
            parts.append(int(m["idx"]))
        elif part.isdigit():
            parts.append(int(part))
        elif part:
            parts.append(part)
        else:
            raise BadInput(f"--set '{item}': empty key segment in '{key}'")
    target: Any = data
    written: list[Any] = []  # the concrete data path, stage kinds and indexes resolved
    for depth, part in enumerate(parts[:-1]):
        target = _descend(target, part, parts[: depth + 1], item, written)
    last = parts[-1]
    if isinstance(target, list):
        if not isinstance(last, int) or last >= len(target):
            raise BadInput(f"--set '{item}': no list element {last!r} here")
        target[last] = value
    elif isinstance(target, dict):
        target[last] = value
    else:
        raise BadInput(f"--set '{item}': '{'.'.join(map(str, parts[:-1]))}' is not a mapping")
    return (*written, last)


def _descend(target: Any, part: str | int, path: list[str | int], item: str, written: list[Any]) -> Any:
    from pipeline.stages import STAGES  # lazy: no recipe -> stages -> recipe cycle

    where = ".".join(map(str, path))
    if isinstance(target, list):
        if isinstance(part, int):
            if part >= len(target):
                raise BadInput(f"--set '{item}': '{where}' is out of range ({len(target)} entries)")
            entry = target[part]
            written.append(part)
            # Address a stage's config directly: stages.1.amount means stages[1].<kind>.amount
            if isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) in STAGES:
                kind = next(iter(entry))
                if entry[kind] is None:
                    entry[kind] = {}
                written.append(kind)
                return entry[kind]
            return entry
        for i, entry in enumerate(target):  # stages.prune -> the first stage of that kind
            if isinstance(entry, dict) and len(entry) == 1 and part in entry:
                if entry[part] is None:
                    entry[part] = {}
                written += [i, part]
                return entry[part]
        raise BadInput(f"--set '{item}': no stage '{part}' in the recipe")
    if isinstance(target, dict):
        if part not in target or target[part] is None:
            target[part] = {}
        written.append(part)
        return target[part]
    raise BadInput(f"--set '{item}': '{where}' is not a mapping or list")


# --------------------------------------------------------------------------------------------
# Error messages: file:line key.path: what was expected, got what


def _format_error(exc: ValidationError, data: Any, node: yaml.Node | None, filename: str,
                  prefix: tuple[Any, ...], applied: Applied | None = None) -> BadInput:
    err = exc.errors()[0]
    loc = prefix + tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        model_fields = _allowed_keys(exc, err)
        hint = f" (allowed: {', '.join(model_fields)})" if model_fields else ""
        suggestion = _did_you_mean(str(loc[-1]), model_fields) if model_fields else ""
        return _error(filename, node, data, loc, f"unknown key{suggestion}{hint}", on_key=True, applied=applied)
    if kind == "missing":
        return _error(filename, node, data, loc, "required key is missing", applied=applied)
    if kind == "value_error" and isinstance(err.get("input"), dict):  # a whole-section check: its message says it all
        return _error(filename, node, data, loc, _expected(err), applied=applied)
    return _error(filename, node, data, loc, f"{_expected(err)}, got {_show(err.get('input'))}", applied=applied)


def _expected(err: dict[str, Any]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "literal_error" and "expected" in ctx:
        options = re.findall(r"'[^']*'|\d+(?:\.\d+)?", str(ctx["expected"]))
        return "expected " + " | ".join(options)
    if kind == "union_tag_invalid":
        options = re.findall(r"'[^']*'", str(ctx.get("expected_tags", "")))
        return "expected source " + " | ".join(options)
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ")
    msg = re.sub(r"^Input should be", "expected", msg)
    return msg[0].lower() + msg[1:] if msg else "invalid value"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _allowed_keys(exc: ValidationError, err: dict[str, Any]) -> list[str]:
    """Best effort: the field names of the model that rejected an extra key."""
    from pipeline.stages import STAGES, get_stage  # lazy: no recipe -> stages -> recipe cycle

    title = exc.title
    from pipeline import recipe_models

    candidates: list[type] = [RecipeHeader, ModelConfig, DataConfig]
    candidates += [getattr(recipe_models, n) for n in ("BuiltinData", "ImageFolderData", "NumpyData", "RandomData")]
    for kind in STAGES:
        try:
            candidates.append(get_stage(kind).Config)
        except Exception:  # a stage module that fails to import is reported when it is used
            continue
    loc = err["loc"]
    # Walk the model tree along loc to find the rejecting model.
    model: Any = next((c for c in candidates if c.__name__ == title), None)
    if model is None:
        return []
    for part in loc[:-1]:
        model = _field_model(model, part)
        if model is None:
            return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _field_model(model: Any, part: Any) -> Any:
    import typing

    from pydantic import BaseModel

    if isinstance(part, int):
        return model
    fields = getattr(model, "model_fields", {})
    field = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
    if field is None:
        # part may be a union tag (e.g. 'imagefolder'): find the member model with that literal
        for m in _models_in(model):
            src = m.model_fields.get("source")
            if src is not None and part in typing.get_args(src.annotation):
                return m
        return None
    for m in _models_in(field.annotation):
        return m
    return None if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)) else field.annotation


def _models_in(annotation: Any) -> list[Any]:
    import typing

    from pydantic import BaseModel

    found: list[Any] = []
    stack = [annotation]
    while stack:
        a = stack.pop()
        if isinstance(a, type) and issubclass(a, BaseModel):
            found.append(a)
        else:
            stack.extend(typing.get_args(a))
    return found


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f", did you mean '{close[0]}'?" if close else ""


def _error(filename: str, node: yaml.Node | None, data: Any, loc: tuple[Any, ...], message: str,
           on_key: bool = False, applied: Applied | None = None) -> BadInput:
    shown, line = _locate(node, data, loc, on_key)
    where = f"{filename}:{line}" if line else filename
    item = _override_for(data, loc, applied or [])
    if item is not None:  # the value came from the command line: name the override, not a recipe line
        where = f"--set '{item}'"
    return BadInput(f"{where} {shown}: {message}" if shown else f"{where}: {message}")


def _override_for(data: Any, loc: tuple[Any, ...], applied: Applied) -> str | None:
    """The last --set item whose written path contains, or lies inside, the failing key path."""
    present: list[Any] = []
    cur = data
    for part in loc:
        if isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            cur = cur[part]
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            continue  # union tags are not in the data
        present.append(part)
    if not present:
        return None
    d = tuple(present)
    for item, path in reversed(applied):
        n = min(len(d), len(path))
        if n and d[:n] == path[:n]:
            return item
    return None


def _locate(node: yaml.Node | None, data: Any, loc: tuple[Any, ...], on_key: bool) -> tuple[str, int | None]:
    """Map a validation loc to a printable key path and the YAML line it came from.

    Parts that are not in the data (pydantic's union tags such as 'imagefolder') are skipped,
    except the last one (a missing or unknown key is named even though it is absent).
    """
    shown = ""
    line = node.start_mark.line + 1 if node is not None else None
    cur_node, cur_data = node, data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int) and isinstance(cur_data, list) and part < len(cur_data):
            shown += f"[{part}]"
            cur_data = cur_data[part]
            if isinstance(cur_node, yaml.SequenceNode) and part < len(cur_node.value):
                cur_node = cur_node.value[part]
                line = cur_node.start_mark.line + 1
            else:
                cur_node = None
            continue
        if isinstance(cur_data, dict) and part in cur_data:
            shown += f".{part}" if shown else str(part)
            cur_data = cur_data[part]
            key_node, value_node = _find_key(cur_node, part)
            if key_node is not None:
                line = (key_node if (on_key and last) else value_node).start_mark.line + 1
            cur_node = value_node
            continue
        if last:
            shown += f".{part}" if shown else str(part)
        # else: a union tag or similar: not in the YAML, skip it
    return shown, line


def _find_key(node: yaml.Node | None, key: Any) -> tuple[yaml.Node | None, yaml.Node | None]:
    if not isinstance(node, yaml.MappingNode):
        return None, None
    for k, v in node.value:
        if k.value == str(key):
            return k, v
    return None, None


MAX_YAML_NODES = 100_000  # a real recipe has a few hundred; an alias bomb has billions
MAX_YAML_DEPTH = 64


def _check_size(node: yaml.Node | None, filename: str) -> None:
    """Refuse YAML whose aliases expand to a huge or cyclic tree, without expanding it.

    Aliases make the node graph a DAG: a 9-level "billion laughs" composes in milliseconds but
    every walk of the resulting data (duplicate keys, pydantic, hashing) takes forever. The expanded
    size is computed per unique node (memoised, iterative), so the check itself is linear.
    """
    if node is None:
        return
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        n, children_done = stack.pop()
        key = id(n)
        children = _children(n)
        if children_done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            line = n.start_mark.line + 1
            if size[key] > MAX_YAML_NODES:
                raise BadInput(f"{filename}:{line}: YAML aliases expand to more than {MAX_YAML_NODES} values "
                               "(an alias bomb?); write the recipe out without nested aliases")
            if depth[key] > MAX_YAML_DEPTH:
                raise BadInput(f"{filename}:{line}: YAML nested deeper than {MAX_YAML_DEPTH} levels")
            continue
        if key in size:
            continue
        if key in on_path:
            raise BadInput(f"{filename}:{n.start_mark.line + 1}: YAML alias refers to itself (a cyclic recipe)")
        on_path.add(key)
        stack.append((n, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def _children(n: yaml.Node) -> list[yaml.Node]:
    if isinstance(n, yaml.MappingNode):
        return [x for pair in n.value for x in pair]
    if isinstance(n, yaml.SequenceNode):
        return list(n.value)
    return []


def _check_duplicate_keys(node: yaml.Node | None, filename: str) -> None:
    """safe_load silently keeps the last of two equal keys; a recipe must not hide a typo that way."""
    stack = [node] if node is not None else []
    visited: set[int] = set()  # aliases share nodes: check each once
    while stack:
        n = stack.pop()
        if id(n) in visited:
            continue
        visited.add(id(n))
        if isinstance(n, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in n.value:
                if k.value in seen:
                    raise BadInput(f"{filename}:{k.start_mark.line + 1} {k.value}: duplicate key")
                seen.add(k.value)
                stack.append(v)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


def dump_lock(recipe: Recipe) -> str:
    """YAML of the fully resolved recipe (recipe.lock.yaml)."""
    return "# fully resolved recipe, written by fmap; defaults included\n" + yaml.safe_dump(
        recipe.to_dict(), sort_keys=False, default_flow_style=False)
