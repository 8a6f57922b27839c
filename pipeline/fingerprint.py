"""Fingerprints of a run's inputs on disk, so `--resume` notices a changed data file at the same path.

Files (weights, .npz data, a `python:` model's source file) are hashed by content. Folders
(imagefolder data) by their listing: every file's relative path, size and mtime, which catches
added, removed, replaced and rewritten images without reading gigabytes of pixels.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_listing_hash(root: Path) -> str:
    """sha256 over (relative path, size, mtime_ns) of every file below `root`, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        try:
            st = p.stat()
        except OSError:
            continue
        if p.is_file():
            h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def path_fingerprint(path: str | Path) -> str:
    """Content hash of a file, listing hash of a folder, 'missing' when absent."""
    p = Path(path)
    if p.is_file():
        return "file:" + sha256_file(p)
    if p.is_dir():
        return "dir:" + folder_listing_hash(p)
    return "missing"


def python_source_file(source: str) -> Path | None:
    """The file of a `python:pkg.mod:factory` model's module, found without importing it."""
    prefix, _, rest = source.partition(":")
    if prefix != "python":
        return None
    module = rest.rpartition(":")[0]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError, AttributeError):  # parent package import failed, bad name
        return None
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and Path(origin).is_file() else None


def input_fingerprints(model: Any, data: Any) -> dict[str, str]:
    """{input: fingerprint} for the model's weights and source file and every data split's path."""
    out: dict[str, str] = {}
    if getattr(model, "weights", None):
        out["model.weights"] = path_fingerprint(model.weights)
    src = python_source_file(model.source)
    if src is not None:
        out["model.source"] = path_fingerprint(src)
    for split in ("calibration", "eval", "train"):
        cfg = getattr(data, split, None)
        path = getattr(cfg, "path", None)
        if path:
            out[f"data.{split}.path"] = path_fingerprint(path)
    return out


def input_hash(recipe: Any) -> str:
    """The root of a run's stage chain: config, fmap version and every input on disk (weights, model
    source, data files/folders). Threads are not in it: they change speed, not what a stage means."""
    import json

    import pipeline

    files = json.dumps(input_fingerprints(recipe.model, recipe.data), sort_keys=True)
    material = recipe.hash_material() + pipeline.__version__ + files
    return hashlib.sha256(material.encode()).hexdigest()


def chain_hash(previous: str, spec: Any) -> str:
    """A stage's hash: the previous stage's hash, its id and its resolved config. Equal hashes mean
    equal inputs, so `--resume` and the stage cache (pipeline.stagecache) may reuse its artifacts."""
    import json

    cfg = json.dumps(spec.to_dict(), sort_keys=True)
    return hashlib.sha256(f"{previous}|{spec.id}|{cfg}".encode()).hexdigest()


def stage_chain(recipe: Any) -> list[str]:
    """The chain hash of every stage of a recipe, in order (what its manifest will record)."""
    out, chain = [], input_hash(recipe)
    for spec in recipe.stages:
        chain = chain_hash(chain, spec)
        out.append(chain)
    return out
