"""Small building blocks shared by SS2D and the VSSM backbone. Tensors are (B, C, H, W), in either memory
format: NCHW (contiguous) or channels-last (NHWC strides, what the fused CPU path runs on). For a channels-last
map `x.permute(0, 2, 3, 1)` is a contiguous (B, H, W, C) view, so LayerNorm2d and Linear2d work on it without
copies and return channels-last maps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, H, W) map; parameters named like nn.LayerNorm.

    Under autocast it normalises in fp32 and returns fp32, on every device (CUDA's autocast already does; CPU's
    would keep bf16). The norms after the stem and each downsample start the residual stream, so the stream
    stays fp32 and only the matmuls and convolutions round to bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            x = x.float()
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


def autocast_off(x: torch.Tensor):
    """A context with autocast off on x's device, for the layers that stay fp32 under bf16: the stem, and SS2D's
    path into the scan (in_proj, the depthwise conv, x_proj, dt_proj), whose rounding reaches the scan's step
    sizes through exp. Kept in bf16 with the rest, they moved the default model's cell probabilities by up to 0.02
    (docs/scan.md, "What runs in bf16"). A no-op outside autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def row_bands(height: int, width: int, pixels: int) -> Iterator[tuple[int, int]]:
    """Row ranges [r0, r1) of about `pixels` pixels each (at least one row): for exact per-pixel work in bands."""
    rows = max(1, pixels // max(width, 1))
    for r0 in range(0, height, rows):
        yield r0, min(r0 + rows, height)
