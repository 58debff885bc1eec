"""`overlay.png`: the heatmap blended over the slide thumbnail, with a colour bar.

It receives only the thumbnail's pixels: label and macro images never reach it.
"""

from __future__ import annotations

import io
import os

import numpy as np

from wsi_vssm.atomic import atomic_write_bytes
from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.heatmap import _grid, _pair, _positive


def heatmap_on_grid(
    prob: np.ndarray, cell0: float, origin: tuple[float, float], slide_dims: tuple[int, int], out_hw: tuple[int, int]
) -> np.ndarray:
    """`prob` resampled (nearest) onto an (h, w) image covering the whole slide; NaN outside the grid.

    `slide_dims` is the level-0 (width, height). Output pixel (r, c) takes the cell containing its centre,
    level-0 ((c + 0.5) * W / w, (r + 0.5) * H / h).
    """
    prob = _grid(prob)
    cell0 = _positive(cell0, "cell0")
    x0, y0 = _pair(origin, "origin")
    sw, sh = (_positive(v, "slide dimension") for v in slide_dims)
    h, w = out_hw
    xs = (np.arange(w) + 0.5) * (sw / w)
    ys = (np.arange(h) + 0.5) * (sh / h)
    cols = np.floor((xs - x0) / cell0).astype(np.int64)
    rows = np.floor((ys - y0) / cell0).astype(np.int64)
    out = np.full((h, w), np.nan, dtype=np.float32)
    ok_c = (cols >= 0) & (cols < prob.shape[1])
    ok_r = (rows >= 0) & (rows < prob.shape[0])
    out[np.ix_(ok_r, ok_c)] = prob[np.ix_(rows[ok_r], cols[ok_c])]
    return out


def overlay_png(
    path: str | os.PathLike,
    thumbnail_rgb: np.ndarray,
    prob: np.ndarray,
    cell0: float,
    origin: tuple[float, float],
    slide_dims: tuple[int, int],
    alpha: float = 0.5,
    cmap: str = "inferno",
) -> None:
    """Write the heatmap over `thumbnail_rgb` (H x W x 3 uint8 of the whole slide) to `path` as PNG, atomically.

    Cells with a probability (tissue) are coloured with `cmap` on [0, 1] and blended with weight `alpha`;
    elsewhere the thumbnail shows as is. A colour bar labelled "tumour probability" sits on the right.
    """
    # The Agg canvas directly, not pyplot: no global backend switch, no figure registry, safe in threads.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    thumb = np.asarray(thumbnail_rgb)
    if thumb.ndim != 3 or thumb.shape[2] < 3 or thumb.dtype != np.uint8 or 0 in thumb.shape[:2]:
        raise UsageError(f"thumbnail must be an H x W x 3 uint8 image, got {thumb.dtype} {thumb.shape}")
    if not 0 <= alpha <= 1:
        raise UsageError(f"alpha must be in [0, 1], got {alpha}")
    if cmap not in colormaps:
        raise UsageError(f"unknown colour map {cmap!r}; e.g. inferno, jet, viridis, magma")
    thumb = thumb[..., :3]
    heat = heatmap_on_grid(prob, cell0, origin, slide_dims, thumb.shape[:2])
    colours = colormaps[cmap](np.clip(np.nan_to_num(heat), 0, 1))[..., :3]
    weight = np.where(np.isfinite(heat), alpha, 0.0)[..., None]
    blended = (thumb / 255.0) * (1 - weight) + colours * weight

    h, w = thumb.shape[:2]
    dpi = 100
    bar_px = max(60, w // 8)  # room for the colour bar and its labels
    fig = Figure(figsize=((w + bar_px) / dpi, max(h, 120) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    total_w, total_h = w + bar_px, max(h, 120)
    ax = fig.add_axes((0, 1 - h / total_h, w / total_w, h / total_h))
    ax.imshow(blended, interpolation="nearest")
    ax.set_axis_off()
    cax = fig.add_axes((w / total_w + 0.12 * bar_px / total_w, 0.1, 0.18 * bar_px / total_w, 0.8))
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=cmap), cax=cax)
    bar.set_label("tumour probability", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
