"""The seed's closed-form formulas, exact integer arithmetic, no torch.

They are the reference that the traced shapes are checked against (tests/profiling/test_profiling_graph.py),
so a layer whose observed shape disagrees with its formula points at a modelling bug, not a guess.
"""

from __future__ import annotations

import math


def effective_kernel(kernel: int, dilation: int = 1) -> int:
    """Span of one dilated kernel: (k - 1) * d + 1."""
    return (kernel - 1) * dilation + 1


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """floor((in + 2p - ((k - 1) * d + 1)) / s) + 1, as torch's Conv{1,2,3}d compute it."""
    return (size + 2 * padding - effective_kernel(kernel, dilation)) // stride + 1


def conv_params(kh: int, kw: int, in_channels: int, out_channels: int, groups: int = 1, bias: bool = True) -> int:
    """(kh * kw * Cin / groups + 1) * Cout; the +1 only with a bias."""
    if in_channels % groups:
        raise ValueError(f"in_channels {in_channels} is not divisible by groups {groups}")
    return (kh * kw * in_channels // groups + (1 if bias else 0)) * out_channels


def conv_macs(out_h: int, out_w: int, kh: int, kw: int, in_channels: int, out_channels: int, groups: int = 1) -> int:
    """Multiply-accumulates of one sample: every output value needs kh*kw*Cin/groups of them."""
    return out_h * out_w * out_channels * kh * kw * (in_channels // groups)


def linear_params(in_features: int, out_features: int, bias: bool = True) -> int:
    return (in_features + (1 if bias else 0)) * out_features


def feature_map_volume(h: int, w: int, channels: int) -> int:
    """H * W * C values in one sample's feature map."""
    return h * w * channels


def pool_output_size(size: int, kernel: int, stride: int | None = None, padding: int = 0, dilation: int = 1,
                     ceil_mode: bool = False) -> int:
    """floor((in + 2p - ((k - 1) * d + 1)) / s) + 1, or ceil with ceil_mode.

    With ceil_mode torch drops a last window that would start inside the right padding only, so
    the result is reduced by one when that window would begin at or past in + p (torch's
    pooling_output_shape). With p = 0, d = 1 this is the seed's floor((in - pool) / s) + 1.
    """
    stride = kernel if stride is None else stride
    span = size + 2 * padding - effective_kernel(kernel, dilation)
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def bytes_of(shape: tuple[int, ...] | list[int], element_size: int = 4) -> int:
    """Bytes of a dense tensor of `shape` (float32 by default)."""
    return math.prod(shape) * element_size
