"""Model and data sources: every way they fail is BadInput with the path or name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import BadInput
from pipeline.recipe_models import ImageFolderData, NumpyData, RandomData
from pipeline.sources.data import build_split
from pipeline.sources.models import build_model, load_weights, model_config_from_string, parse_shape


def small() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.Flatten())


class Custom(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)


def test_torchvision_model_builds_with_random_weights():
    m = build_model(model_config_from_string("torchvision:resnet18"))
    assert not m.training and m.fc.out_features == 1000


def test_unknown_torchvision_name_suggests():
    with pytest.raises(BadInput, match=r"torchvision:resnet19.*did you mean.*resnet18"):
        build_model(model_config_from_string("torchvision:resnet19"))


@pytest.mark.parametrize("spec,fragment", [
    ("resnet18", "expected 'torchvision:NAME'"),
    ("python:nomodule", "module and factory"),
    ("builtin:nothing", "does not exist"),
    ("python:no_such_module_xyz:f", "cannot import module"),
    ("python:test_sources:missing", "no callable 'missing'"),
    ("python:numpy:zeros", "failed to build"),
])
def test_bad_model_specs(spec, fragment):
    with pytest.raises(BadInput, match=fragment):
        build_model(model_config_from_string(spec))


def test_weights_roundtrip_and_errors(tmp_path):
    model = small()
    good = tmp_path / "w.pth"
    torch.save(model.state_dict(), good)
    fresh = load_weights(small(), str(good))
    assert torch.equal(fresh[0].weight, model[0].weight)
    with pytest.raises(BadInput, match="does not exist"):
        load_weights(small(), str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save(torch.nn.Conv2d(3, 5, 1).state_dict(), wrong)
    with pytest.raises(BadInput, match="does not match the model"):
        load_weights(small(), str(wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BadInput, match="not a torch checkpoint"):
        load_weights(small(), str(garbage))


def test_pickled_module_refused_unless_allowed(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(Custom(), path)  # a pickled module: arbitrary code on load
    with pytest.raises(BadInput, match="allow_pickle"):
        load_weights(small(), str(path))
    assert isinstance(load_weights(small(), str(path), allow_pickle=True), Custom)


def test_parse_shape():
    assert parse_shape("1,3,224,224") == [1, 3, 224, 224] == parse_shape("1x3x224x224")
    with pytest.raises(BadInput):
        parse_shape("1,a")


def test_numpy_split_nhwc_uint8_and_errors(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.full((5, 4, 4, 3), 255, dtype=np.uint8), y=np.arange(5))
    split = build_split(NumpyData(source="numpy", path=str(path), batch_size=2), "eval", [1, 3, 4, 4])
    batches = list(split.batches())
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0][0].shape == (2, 3, 4, 4) and float(batches[0][0].max()) == 1.0
    assert split.has_labels and split.num_classes == 5
    with pytest.raises(BadInput, match="does not exist"):
        build_split(NumpyData(source="numpy", path=str(tmp_path / "no.npz")), "eval", [1, 3, 4, 4])
    with pytest.raises(BadInput, match="expects"):
        build_split(NumpyData(source="numpy", path=str(path)), "eval", [1, 3, 8, 8])
    (tmp_path / "bad.npz").write_text("nope")
    with pytest.raises(BadInput, match="not a readable"):
        build_split(NumpyData(source="numpy", path=str(tmp_path / "bad.npz")), "eval", [1, 3, 4, 4])


def test_imagefolder_split_streams_labelled_batches(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), color=(i * 40, 10, 200)).save(tmp_path / cls / f"{i}.png")
    split = build_split(ImageFolderData(source="imagefolder", path=str(tmp_path), size=16, batch_size=4), "eval",
                        [1, 3, 16, 16])
    xs, ys = zip(*split.batches())
    assert split.num_samples == 6 and split.num_classes == 2
    assert xs[0].shape == (4, 3, 16, 16) and sorted(torch.cat(ys).tolist()) == [0, 0, 0, 1, 1, 1]
    # a folder of images without class subfolders is an unlabelled split (agreement, distillation)
    flat = build_split(ImageFolderData(source="imagefolder", path=str(tmp_path / "cat")), "eval", [1, 3, 16, 16])
    assert not flat.has_labels and len(flat) == 3 and next(flat.batches())[1] is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no images and no class subfolders"):
        build_split(ImageFolderData(source="imagefolder", path=str(tmp_path / "empty")), "eval", [1, 3, 16, 16])


def test_random_split_is_seeded_and_unlabelled():
    cfg = RandomData(source="random", samples=5, batch_size=2)
    a = [x for x, _ in build_split(cfg, "eval", [1, 3, 4, 4]).batches()]
    b = [x for x, _ in build_split(cfg, "eval", [1, 3, 4, 4]).batches()]
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and sum(len(x) for x in a) == 5


def test_digits_splits_are_disjoint_and_fixed():
    from pipeline.sources.builtin import digits_splits

    s = digits_splits()
    sizes = {k: len(v[1]) for k, v in s.items()}
    assert sizes == {"train": 1078, "calibration": 179, "test": 540}
    assert s["train"][0].shape[1:] == (1, 32, 32)


def test_builtin_digits_model_reaches_97_percent():
    """The embedded default must be a real model: >= 97% on the held-out digits test split."""
    from pipeline.sources.builtin import digits_test_accuracy, pretrained_digits_cnn

    acc = digits_test_accuracy(pretrained_digits_cnn())
    print(f"builtin digits_cnn test accuracy: {acc:.4f}")
    assert acc >= 0.97
