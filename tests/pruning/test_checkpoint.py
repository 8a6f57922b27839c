"""Portable checkpoints: a pruned model saved, then loaded into a fresh base model, is identical."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import BadInput
from pipeline.pruning.checkpoint import is_fmap_checkpoint, load_checkpoint, save_checkpoint
from pipeline.pruning.engine import PruneSettings, default_protection, prune_copy
from conftest import TinyCNN  # tests/ is on sys.path (rootdir conftest)


def _roundtrip(tmp_path, make_model, x, ratio=0.3):
    torch.manual_seed(0)
    base = make_model().eval()
    pruned = prune_copy(base, x, ratio, PruneSettings(criterion="l1"), default_protection(base, x))
    with torch.no_grad():  # make BN statistics non-default so buffers matter
        for m in pruned.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    path = save_checkpoint(tmp_path / "p.pt", pruned, base_source={"source": "test"}, history={"ratio": ratio})
    raw = torch.load(path, weights_only=True)
    assert is_fmap_checkpoint(raw) and raw["fmap_format"] == "fmap-checkpoint/1"
    torch.manual_seed(1)  # a fresh base with different random weights
    loaded = load_checkpoint(path, make_model()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    return pruned, loaded


def test_roundtrip_tinycnn(tmp_path):
    pruned, loaded = _roundtrip(tmp_path, TinyCNN, torch.randn(2, 1, 16, 16))
    assert loaded.conv3.out_channels == pruned.conv3.out_channels < 16


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_roundtrip_torchvision(tmp_path, name):
    import torchvision

    pruned, loaded = _roundtrip(tmp_path, lambda: torchvision.models.get_model(name, weights=None, num_classes=10),
                                torch.randn(1, 3, 64, 64))
    widths = [m.out_channels for m in loaded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]


def test_not_a_checkpoint_is_bad_input(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(TinyCNN().state_dict(), path)
    assert not is_fmap_checkpoint(torch.load(path, weights_only=True))
    with pytest.raises(BadInput, match="not an fmap checkpoint"):
        load_checkpoint(path, TinyCNN())


def test_wrong_base_model_is_bad_input(tmp_path):
    x = torch.randn(1, 1, 16, 16)
    base = TinyCNN().eval()
    path = save_checkpoint(tmp_path / "p.pt", prune_copy(base, x, 0.3, PruneSettings(criterion="l1"),
                                                            default_protection(base, x)),
                           base_source={}, history={})
    with pytest.raises(BadInput, match="does not exist in the base model"):
        load_checkpoint(path, torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3)))
