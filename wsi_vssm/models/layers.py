"""Small building blocks shared by SS2D and the VSSM backbone. Tensors are (B, C, H, W), in either memory
format: NCHW (contiguous) or channels-last (NHWC strides, what the fused CPU path runs on). For a channels-last
map `x.permute(0, 2, 3, 1)` is a contiguous (B, H, W, C) view, so LayerNorm2d and Linear2d work on it without
copies and return channels-last maps."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, H, W) map; parameters named like nn.LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides


class Linear2d(nn.Linear):
    """A per-pixel Linear on (B, C_in, H, W) -> (B, C_out, H, W); weight (C_out, C_in) as nn.Linear.
    NCHW input: a 1x1 convolution (today's path). Any other layout (channels-last): one GEMM on the (B, H, W, C)
    view, output channels-last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous():
            return F.conv2d(x, self.weight[:, :, None, None], self.bias)
        return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training, rescaled by 1 / keep."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def row_bands(height: int, width: int, pixels: int) -> Iterator[tuple[int, int]]:
    """Row ranges [r0, r1) of about `pixels` pixels each (at least one row): for exact per-pixel work in bands."""
    rows = max(1, pixels // max(width, 1))
    for r0 in range(0, height, rows):
        yield r0, min(r0 + rows, height)
