"""The 2D cross-scan of SS2D: four 1D orders over an H x W map, and the merge back to 2D.

Directions (L = H * W, a pixel (h, w) is flat index h * W + w in row-major memory):
    k = 0  row-major:            position p visits pixel p
    k = 1  column-major:         position p = w * H + h visits (h, w)
    k = 2  row-major reversed:   position p visits what k = 0 visits at L - 1 - p
    k = 3  column-major reversed
`cross_merge` sums, for every pixel, the four directions' outputs read back at the position where each
direction visited it. `scan_positions` gives the same orders as index arithmetic over a range of positions,
so a chunk of one direction can be gathered (and its output scattered back) without building the four copies.
All functions are plain differentiable torch; a fused kernel, when one is added, is checked against these.
"""

from __future__ import annotations

import torch

K_DIRECTIONS = 4  # row-major, column-major, then each of them reversed


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B, 4, D, L): the four scan orders, direction-major."""
    b, d, h, w = x.shape
    rows = x.reshape(b, d, h * w)  # k = 0
    cols = x.transpose(2, 3).reshape(b, d, h * w)  # k = 1: (B, D, W, H) flattened
    fwd = torch.stack([rows, cols], dim=1)  # (B, 2, D, L)
    return torch.cat([fwd, fwd.flip(-1)], dim=1)  # k = 2, 3 are the reverses


def cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 4, D, L) -> (B, D, H, W): each pixel sums its four directions' outputs."""
    b, k, d, length = ys.shape
    if k != K_DIRECTIONS or length != height * width:
        raise ValueError(f"cross_merge needs (B, 4, D, {height * width}), got {tuple(ys.shape)}")
    y = ys[:, 0:2] + ys[:, 2:4].flip(-1)  # (B, 2, D, L) undo the reversals
    rows = y[:, 0].reshape(b, d, height, width)
    cols = y[:, 1].reshape(b, d, width, height).transpose(2, 3)  # column-major back to (H, W)
    return rows + cols


def scan_positions(
    k: int, height: int, width: int, start: int, end: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Row-major pixel indices (int64, shape (end - start,)) visited by direction k at positions [start, end)."""
    if k not in range(K_DIRECTIONS):
        raise ValueError(f"direction k must be 0..3, got {k}")
    length = height * width
    if not 0 <= start <= end <= length:
        raise ValueError(f"positions [{start}, {end}) outside a sequence of length {length}")
    p = torch.arange(start, end, device=device, dtype=torch.long)
    if k >= 2:  # reversed orders: position p is the forward order's position L - 1 - p
        p = (length - 1) - p
    if k % 2 == 0:
        return p
    # column-major: p = w * H + h  ->  pixel h * W + w
    return (p % height) * width + torch.div(p, height, rounding_mode="floor")
