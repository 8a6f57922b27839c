"""`fmap visualize` through Click's CliRunner: images in, gallery out, bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.commands.visualize import visualize
from test_visualize import PLANTED, PlantedNet


def planted_net() -> PlantedNet:  # referenced as python:test_visualize_cli:planted_net
    return PlantedNet().eval()


SPEC = "python:test_visualize_cli:planted_net"


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        arr = np.full((24, 24), 10, dtype=np.uint8)
        arr[3 + 4 * i:8 + 4 * i, 5:10] = 255
        Image.fromarray(arr).convert("RGB").save(folder / f"sq{i}.png")  # RGB on disk: converted to L
    return folder


def test_visualize_folder_writes_gallery_and_finds_planted_channel(image_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    res = CliRunner().invoke(visualize, [SPEC, "--images", str(image_dir), "--input-shape", "1,1,24,24",
                                         "--out", str(out), "--layers", "conv", "--top-k", "2", "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert metrics["images"] == 3 and metrics["layers"]["conv"]["top_channels"][0][0] == PLANTED
    html = (out / "qa.html").read_text()
    assert "sq0.png" in html and html.count("<tr ") == 3
    assert (out / "visualize" / "gradcam_conv.png").exists()
    assert json.loads((out / "visualize.json").read_text())["images"] == 3


def test_visualize_npz_with_labels(tmp_path: Path):
    x = np.random.default_rng(0).random((4, 1, 24, 24)).astype(np.float32) * 0.1
    x[:, :, 5:10, 5:10] = 1.0
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 0, 1, 0]))
    out = tmp_path / "out"
    res = CliRunner().invoke(visualize, [SPEC, "--images", str(tmp_path / "d.npz"), "--input-shape", "1,1,24,24",
                                         "--out", str(out), "--max-images", "3"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "visualize.json").read_text())
    assert metrics["images"] == 3 and metrics["labelled"] is True
    assert (out / "qa.html").read_text().count("<tr ") == 3


@pytest.mark.parametrize("args, message", [
    (["--layers", "conv_x"], "did you mean: conv"),
    (["--images", "/no/such/dir"], "no such file"),
    (["--images", "builtin:digits"], "holds 1x32x32 digits, but"),
])
def test_visualize_bad_input_exits_2(image_dir: Path, tmp_path: Path, args: list[str], message: str):
    base = {"--images": str(image_dir)}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = [SPEC, "--input-shape", "1,1,24,24", "--out", str(tmp_path / "o")] + [v for kv in base.items() for v in kv]
    res = CliRunner().invoke(visualize, argv)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
