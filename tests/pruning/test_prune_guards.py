"""Graph guards: channel shuffle and custom attention are left whole, the rest prunes exactly."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.pruning.engine import PruneSettings, Protection, default_protection, prune_copy
from pipeline.pruning.guards import ATTENTION_REASON, SHUFFLE_REASON, is_channel_regroup
from pipeline.profiling.stats import collect_channel_stats


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleNetLike(nn.Module):
    """stem -> chunk -> (identity, branch) -> cat -> shuffle -> depthwise -> head (ShuffleNetV2 unit)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branch_a = nn.Conv2d(8, 12, 1)
        self.branch_b = nn.Conv2d(12, 8, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head_conv = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.stem(x).chunk(2, dim=1)
        x = channel_shuffle(torch.cat([x1, self.branch_b(torch.relu(self.branch_a(x2)))], 1), 2)
        return self.fc(self.head_conv(self.dw(x)).mean((2, 3)))


class WidthAttention(nn.Module):
    """Attention whose forward reshapes by the input width (like Swin's window attention)."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1), -1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


class TinyTransformer(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1, self.attn = nn.LayerNorm(dim), WidthAttention(dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 32), nn.Linear(32, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(torch.relu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


def _zero_rows(layer: nn.Module, rows: range) -> None:
    """Make output channels `rows` exactly zero after a ReLU: pruning them must not change the output."""
    with torch.no_grad():
        layer.weight[list(rows)] = 0.0
        layer.bias[list(rows)] = -1.0


def _prune_half(model: nn.Module, x: torch.Tensor, ignore: tuple[str, ...] = ()) -> tuple[nn.Module, Protection]:
    stats = collect_channel_stats(model, [torch.randn(4, *x.shape[1:]) for _ in range(2)])
    protect = default_protection(model, x, ignore)
    return prune_copy(model, x, 0.5, PruneSettings(ignored=ignore), protect, stats), protect


def test_channel_regroup_shapes():
    assert is_channel_regroup(torch.Size([1, 16, 4, 4]), torch.Size([1, 2, 8, 4, 4]))
    assert is_channel_regroup(torch.Size([1, 8, 2, 4, 4]), torch.Size([1, 16, 4, 4]))
    assert not is_channel_regroup(torch.Size([1, 16, 4, 4]), torch.Size([1, 16, 16]))
    assert not is_channel_regroup(torch.Size([1, 16, 4, 4]), torch.Size([1, 16, 2, 2, 4]))  # splits H


def test_shuffle_unit_prunes_branch_and_keeps_output():
    torch.manual_seed(0)
    model = ShuffleNetLike().eval()
    _zero_rows(model.branch_a, range(6))  # dead half of the branch's hidden width
    x = torch.randn(1, 3, 8, 8)
    pruned, protect = _prune_half(model, x, ignore=("head_conv",))
    assert pruned.branch_a.out_channels == 6 and pruned.branch_b.in_channels == 6
    for name in ("stem", "branch_b", "dw"):  # feed or read the shuffle: left alone, with the reason
        assert protect.reasons[name] == SHUFFLE_REASON
        assert getattr(pruned, name).out_channels == getattr(model, name).out_channels
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x))


def test_custom_attention_left_whole_mlp_pruned():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    _zero_rows(model.fc1, range(16))
    x = torch.randn(1, 3, 16, 16)
    pruned, protect = _prune_half(model, x)
    assert protect.reasons["attn.qkv"] == ATTENTION_REASON
    assert pruned.fc1.out_features == 16
    assert (pruned.attn.qkv.weight.shape, pruned.embed.out_channels) == (model.attn.qkv.weight.shape, 16)
    assert "forward" not in vars(pruned.attn)  # the tracing guard is gone from the returned model
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x))
