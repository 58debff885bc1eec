"""The one colour rule for a tumour-probability heatmap, shared by `overlay.png` and the napari heatmap layer.

- Contrast limits are fixed to [0, 1]: a colour always means the same probability, on every slide.
- Below the cell threshold a cell is fully transparent, so the morphology shows untouched; no tissue (NaN) too.
- At and above the threshold the colour comes from a perceptual colour map (viridis: blue-green to yellow,
  hues that H&E does not have) and the opacity rises linearly with the probability, from `ALPHA_AT_THRESHOLD`
  at the threshold to `ALPHA_AT_ONE` at 1.

matplotlib is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

import math

import numpy as np

from wsi_vssm.errors import UsageError, is_real_number

HEATMAP_CMAP = "viridis"
CONTRAST_LIMITS = (0.0, 1.0)
ALPHA_AT_THRESHOLD = 0.3
ALPHA_AT_ONE = 0.7


def check_threshold(threshold) -> float:
    """`threshold` as a float in [0, 1]; anything else raises UsageError."""
    if not (is_real_number(threshold) and math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise UsageError(f"cell threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


def heatmap_alpha(prob, threshold: float, alpha_max: float = ALPHA_AT_ONE) -> np.ndarray:
    """Opacity for each probability (float32, same shape): 0 below `threshold` or NaN, else rising linearly to
    `alpha_max` at 1 (from `alpha_max * ALPHA_AT_THRESHOLD / ALPHA_AT_ONE` at the threshold).
    """
    t = check_threshold(threshold)
    if not (isinstance(alpha_max, (int, float)) and 0 < alpha_max <= 1):
        raise UsageError(f"alpha must be in (0, 1], got {alpha_max!r}")
    start = alpha_max * ALPHA_AT_THRESHOLD / ALPHA_AT_ONE
    p = np.clip(np.asarray(prob, dtype=np.float32), *CONTRAST_LIMITS)
    finite = np.isfinite(p)
    span = max(1.0 - t, 1e-6)
    rise = np.clip((np.nan_to_num(p) - t) / span, 0.0, 1.0)
    alpha = start + (alpha_max - start) * rise
    return np.where(finite & (np.nan_to_num(p, nan=-1.0) >= t), alpha, 0.0).astype(np.float32)


def heatmap_rgba(prob, threshold: float, cmap: str = HEATMAP_CMAP, alpha_max: float = ALPHA_AT_ONE) -> np.ndarray:
    """RGBA floats in [0, 1], shape `prob.shape + (4,)`: `cmap` over the fixed limits [0, 1], alpha per the rule.

    Raises UsageError for an unknown `cmap`, a threshold outside [0, 1] or a non-numeric `prob`.
    """
    p = np.asarray(prob)
    if not np.issubdtype(p.dtype, np.number):
        raise UsageError(f"probabilities must be numeric, got dtype {p.dtype}")
    alpha = heatmap_alpha(p, threshold, alpha_max)
    lo, hi = CONTRAST_LIMITS
    scaled = (np.clip(np.nan_to_num(p.astype(np.float32), nan=lo), lo, hi) - lo) / (hi - lo)
    rgba = colormap(cmap)(scaled).astype(np.float32)
    rgba[..., 3] = alpha
    return rgba


def heatmap_lut(threshold: float, n: int = 256, cmap: str = HEATMAP_CMAP) -> tuple[np.ndarray, np.ndarray]:
    """`(controls, colors)` for a napari `Colormap` (linear interpolation) over the contrast limits [0, 1].

    About `n` increasing values in [0, 1] and their RGBA (len, 4). The threshold and a value 1e-6 below it are
    among the controls, so the step from transparent to tinted falls on the threshold and not between two controls.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise UsageError(f"n must be an integer >= 2, got {n!r}")
    t = check_threshold(threshold)
    controls = np.union1d(np.linspace(0.0, 1.0, n), [max(t - 1e-6, 0.0), t])
    return controls, heatmap_rgba(controls, t, cmap)


def colormap(name: str = HEATMAP_CMAP):
    """The matplotlib colour map `name`; UsageError if there is none."""
    from matplotlib import colormaps

    if not isinstance(name, str) or name not in colormaps:
        raise UsageError(f"unknown colour map {name!r}; e.g. {HEATMAP_CMAP}, cividis, magma")
    return colormaps[name]
