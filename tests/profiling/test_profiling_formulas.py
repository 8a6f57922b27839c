"""The seed formulas, checked on the worked examples and against torch itself."""

import pytest
import torch

from pipeline.profiling import formulas as F


def test_worked_examples():
    assert F.conv_output_size(32, 5, stride=1, padding=2) == 32
    assert F.conv_params(3, 3, 64, 128, bias=True) == 73_856
    assert F.conv_params(3, 3, 64, 128, bias=False) == 73_728
    assert F.feature_map_volume(28, 28, 64) == 50_176
    assert F.effective_kernel(3, dilation=2) == 5


@pytest.mark.parametrize("size,k,s,p,d", [(32, 3, 1, 1, 1), (224, 7, 2, 3, 1), (17, 3, 2, 0, 2), (9, 1, 3, 0, 1)])
def test_conv_formula_matches_torch(size, k, s, p, d):
    conv = torch.nn.Conv2d(2, 4, k, stride=s, padding=p, dilation=d, groups=2)
    out = conv(torch.zeros(1, 2, size, size))
    assert out.shape[-1] == F.conv_output_size(size, k, s, p, d)
    assert sum(t.numel() for t in conv.parameters()) == F.conv_params(k, k, 2, 4, groups=2)


@pytest.mark.parametrize("size,k,s,p,ceil", [(112, 3, 2, 1, False), (55, 3, 2, 0, True), (10, 3, 2, 1, True),
                                             (7, 2, 2, 0, True), (32, 2, 2, 0, False)])
def test_pool_formula_matches_torch(size, k, s, p, ceil):
    out = torch.nn.MaxPool2d(k, s, p, ceil_mode=ceil)(torch.zeros(1, 1, size, size))
    assert out.shape[-1] == F.pool_output_size(size, k, s, p, ceil_mode=ceil)
    assert F.pool_output_size(size, k, s) == (size - k) // s + 1  # the seed's form without padding


def test_conv_params_rejects_bad_groups():
    with pytest.raises(ValueError):
        F.conv_params(3, 3, 10, 8, groups=3)
