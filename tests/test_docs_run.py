"""Docs that run: every shell block of README.md and docs/**/*.md runs as written.

Each fenced ```bash / ```sh / ```shell / ```console block is one bash script (`set -eo pipefail`,
so any failing command fails the block); the blocks of one document run in order in one fresh
directory, as a reader following the page would. `fmap` there is this checkout's CLI. A block may
be preceded by a marker comment (invisible on GitHub) with one rule per line:

    <!-- fmap-docs
    slow: fmap run recipes/quickstart.yaml -- a whole quickstart run
    skip: make test -- the test suite itself
    -->

`KIND: PREFIX -- REASON` applies to the block's lines that start with PREFIX; `KIND -- REASON`
(no prefix) to the whole block. Kinds: `slow` (run only by the slow test below), `skip`, `gpu`
and `cluster` (never run here: no network, no CUDA device, no cluster). A reason is required and
a rule that matches no line fails the test, so markers cannot rot. Untagged fences that hold
`fmap`/`make`/`pip` commands fail too: a synopsis is tagged ```text, a command ```bash.

Placeholders the docs name (recipe.yaml, runs/quickstart, runs/main, runs/pr, images/, mynet.py,
model.onnx) are made by the fixture from the session's one quickstart run (tests/conftest.py) and
the tiny model of the journeys, only where a document names them and neither makes them itself
(`--out DIR`) nor tests whether they exist (`[ -d DIR ]`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.sources.test_model_sources import MODEL_PY

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_TAGS = {"bash", "sh", "shell", "console"}
KINDS = {"slow", "skip", "gpu", "cluster"}
NEVER = {"skip", "gpu", "cluster"}  # not run by either test

# The timing of the first docs test includes the session's quickstart run (shared with test_e2e).
pytestmark = pytest.mark.timeout(1500)


@dataclass
class Rule:
    kind: str
    prefix: str | None  # None: the whole block
    reason: str
    used: bool = False


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    lines: list[str]
    rules: list[Rule] = field(default_factory=list)

    @property
    def where(self) -> str:
        doc = self.doc.relative_to(ROOT) if self.doc.is_relative_to(ROOT) else self.doc
        return f"{doc}:{self.line}"


def parse_rules(comment: str, where: str) -> list[Rule]:
    """Rules of one `<!-- fmap-docs ... -->` comment (see the module doc)."""
    body = comment.strip()[len("<!--"):-len("-->")].strip()[len("fmap-docs"):].lstrip(" :")
    rules = []
    for raw in filter(None, (r.strip() for r in re.split(r"[\n;]", body))):
        head, sep, reason = raw.partition(" -- ")
        kind, _, prefix = head.partition(":")
        if kind.strip() not in KINDS or not sep or not reason.strip():
            raise AssertionError(f"{where}: bad fmap-docs rule {raw!r}: expected 'KIND[: PREFIX] -- REASON', "
                                 f"KIND in {sorted(KINDS)}")
        rules.append(Rule(kind.strip(), prefix.strip() or None, reason.strip()))
    return rules


def blocks(doc: Path) -> list[Block]:
    """Fenced blocks of a Markdown file with the marker comment right above each (if any)."""
    text = doc.read_text().splitlines()
    found, i = [], 0
    while i < len(text):
        m = re.match(r"^\s*```(\S*)\s*$", text[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1).lower()
        end = next(j for j in range(i + 1, len(text)) if text[j].strip().startswith("```"))
        block = Block(doc, start + 1, lang, text[start + 1:end])
        if start > 0 and text[start - 1].strip().endswith("-->"):
            top = start - 1
            while "<!--" not in text[top]:
                top -= 1
            comment = "\n".join(text[top:start])
            if comment.strip().startswith("<!-- fmap-docs"):
                block.rules = parse_rules(comment, block.where)
        found.append(block)
        i = end + 1
    return found


def shell_blocks(doc: Path) -> list[Block]:
    return [b for b in blocks(doc) if b.lang in SHELL_TAGS]


def rule_for(block: Block, line: str) -> Rule | None:
    for rule in block.rules:
        if rule.prefix is None or line.strip().startswith(rule.prefix):
            return rule
    return None


def script(block: Block, slow: bool) -> str:
    """The block as bash, with the lines this test does not run replaced by a visible no-op."""
    out: list[str] = []
    dropping = False  # inside a dropped command's `\` continuation lines
    for line in block.lines:
        if dropping:
            dropping = line.rstrip().endswith("\\")
            continue
        rule = rule_for(block, line) if line.strip() and not line.lstrip().startswith("#") else None
        if rule is not None:
            rule.used = True
            if rule.kind in NEVER or (rule.kind == "slow" and not slow):
                out.append(f": not run here, {rule.kind}: {rule.reason!r}")
                dropping = line.rstrip().endswith("\\")
                continue
        out.append(line)
    return "set -eo pipefail\n" + "\n".join(out) + "\n"


# ---- the directory a reader would have -------------------------------------------------------

# the reader's own model file (a small CNN for 24-pixel RGB images), with the factory the docs name
FACTORY_PY = MODEL_PY.replace("def tiny_net(", "def build_net(")

MAKE_ONNX = """
import sys, warnings, torch
sys.path.insert(0, ".")
from mynet import build_net
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(build_net().eval(), (torch.randn(1, 3, 24, 24),), "model.onnx", dynamo=False)
"""

RUN_DIRS = ("runs/quickstart", "runs/main", "runs/pr", "runs/baseline")


def make_project(root: Path, text: str, quickstart: Path) -> dict[str, str]:
    """What the document names but does not make, made in `root`; returns the shell environment."""
    from test_journeys import make_folder

    shutil.copytree(ROOT / "recipes", root / "recipes")

    def wanted(name: str) -> bool:
        named = re.search(rf"(?<![\w/.-]){re.escape(name)}(?![\w-])", text) is not None
        return named and not re.search(rf"(--out|-d) {re.escape(name)}(?![\w/-])", text)

    for run in RUN_DIRS:
        if wanted(run):
            shutil.copytree(quickstart, root / run)
    if wanted("recipe.yaml"):  # the resolved recipe of runs/quickstart, so `--resume` finds it finished
        shutil.copy(quickstart / "recipe.lock.yaml", root / "recipe.yaml")
        if not (root / "runs/quickstart").exists():
            shutil.copytree(quickstart, root / "runs/quickstart")
    if wanted("images/") or wanted("images"):
        make_folder(root)
    if wanted("mynet.py") or wanted("model.onnx"):
        (root / "mynet.py").write_text(FACTORY_PY)
    env = dict(os.environ, CI="1", PYTHONPATH=str(ROOT))
    if wanted("model.onnx"):
        made = subprocess.run([sys.executable, "-c", MAKE_ONNX], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300)
        assert made.returncode == 0, made.stderr
    return env | {"PATH": f"{shims(root / '.bin')}{os.pathsep}{env['PATH']}"}


def shims(bin_dir: Path) -> Path:
    """`fmap` is this checkout's CLI; `make` uses the Makefile with the environment already installed
    (never pip-installs), so `make demo` runs the real target here."""
    bin_dir.mkdir()
    prefix = Path(sys.prefix)
    make = shutil.which("make") or "make"
    for name, body in {
        "fmap": f'exec "{sys.executable}" -m pipeline.cli "$@"',
        "make": f'exec "{make}" -f "{ROOT / "Makefile"}" VENV="{prefix}" PY="{sys.executable}" '
                f'-o "{prefix / ".fmap-installed"}" "$@"',
    }.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return bin_dir


def run_doc(doc: Path, tmp_path: Path, quickstart: Path, slow: bool) -> int:
    """Run the document's shell blocks in order; returns how many commands ran."""
    found = shell_blocks(doc)
    text = "\n".join(line for b in found for line in b.lines)
    tmp_path.mkdir(exist_ok=True)
    env = make_project(tmp_path, text, quickstart)
    ran = 0
    for block in found:
        body = script(block, slow)
        ran += sum(1 for line in body.splitlines()[1:] if line.strip() and not line.lstrip().startswith((":", "#")))
        proc = subprocess.run(["bash", "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=3000 if slow else 300)
        assert proc.returncode == 0, (f"{block.where} does not run as written (exit {proc.returncode}):\n"
                                      f"{textwrap.indent(body, '  ')}\nstderr:\n{proc.stderr[-3000:]}")
    stale = [f"{b.where}: {r.kind}: {r.prefix}" for b in found for r in b.rules if not r.used]
    assert not stale, f"fmap-docs rules that match no command: {stale}"
    return ran


def doc_id(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


RUNNABLE = [d for d in DOCS if shell_blocks(d)]


@pytest.mark.parametrize("doc", RUNNABLE, ids=doc_id)
def test_doc_commands_run_as_written(doc: Path, quickstart_run, tmp_path: Path):
    """The cheap commands of each document (all but slow/skip/gpu/cluster), on the builtin model."""
    out, proc = quickstart_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_doc(doc, tmp_path, out, slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("doc", RUNNABLE, ids=doc_id)
def test_doc_commands_run_as_written_including_slow_ones(doc: Path, quickstart_run, tmp_path: Path):
    """Every command but those that need a GPU, a cluster or are skipped with a reason: full runs too."""
    out, proc = quickstart_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_doc(doc, tmp_path, out, slow=True)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_commands_sit_in_shell_blocks_and_markers_parse(doc: Path):
    """A command in an untagged fence would escape the test above; every marker must parse."""
    for block in blocks(doc):
        if block.lang == "":
            cmds = [line for line in block.lines if re.match(r"\s*(fmap|make|pip) ", line)]
            assert not cmds, f"{block.where}: untagged fence holds commands {cmds}: tag it bash (or text)"


def test_rules_select_lines_and_stale_rules_are_caught(tmp_path: Path):
    doc = tmp_path / "d.md"
    doc.write_text("x\n<!-- fmap-docs\nslow: fmap run -- long\nskip: pip install -- network\n-->\n```bash\n"
                   "fmap validate r.yaml\nfmap run r.yaml\npip install x\n```\n")
    (block,) = blocks(doc)
    fast = script(block, slow=False)
    assert "fmap validate r.yaml" in fast and "\nfmap run r.yaml" not in fast and "\npip install" not in fast
    slow = script(block, slow=True)
    assert "\nfmap run r.yaml" in slow and "\npip install" not in slow
    doc.write_text("<!-- fmap-docs: slow: fmap sweep -- long -->\n```sh\nfmap sweep r.yaml \\\n  --grid a=1,2\n"
                   "fmap validate r.yaml\n```\n")
    (block,) = blocks(doc)
    assert script(block, slow=False).splitlines()[2:] == ["fmap validate r.yaml"]  # continuation dropped too
    doc.write_text("<!-- fmap-docs: gpu: trtexec -- needs CUDA -->\n```bash\nfmap profile x\n```\n")
    (block,) = blocks(doc)
    script(block, slow=True)
    assert not block.rules[0].used
    with pytest.raises(AssertionError, match="bad fmap-docs rule"):
        parse_rules("<!-- fmap-docs: slow fmap run -->", "d.md:1")


def test_a_command_that_fails_as_written_fails_the_doc(tmp_path: Path):
    doc = tmp_path / "d.md"
    doc.write_text("```bash\nfmap validate recipes/quickstart.yaml\nfmap validate no-such-recipe.yaml\n```\n")
    with pytest.raises(AssertionError, match=r"d.md:1 does not run as written \(exit 2\)"):
        run_doc(doc, tmp_path / "project", ROOT / "no-run-needed", slow=False)
