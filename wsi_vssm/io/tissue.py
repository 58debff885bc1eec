"""Tissue detection on a slide thumbnail: colour rules for stain versus pen and background, then clean-up.

H&E tissue is pink to purple (hue roughly 270-350 degrees) with moderate colourfulness; IHC adds brown (DAB)
and a pale blue-grey haematoxylin. Background is bright and colourless (white, or grey where the glass or the
scan is dim). Pen ink is either far more colourful than stain (red), of a hue stain never has (green, cyan,
strong blue), or near black. Out-of-focus smears are smooth: their local contrast is low. The rules below use
chroma (max - min of RGB, in 0..1) rather than HSV saturation because saturation blows up on dark pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import ndimage as ndi

from wsi_vssm.errors import UsageError

# Optical density of pure haematoxylin, eosin and DAB, one row each (Ruifrok & Johnston 2001): the one copy of
# these numbers (stain augmentation and the domain check both deconvolve with them). Rows normalised below.
STAIN_OD = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = STAIN_OD / np.linalg.norm(STAIN_OD, axis=1, keepdims=True)  # hed @ M -> od
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)  # od @ M -> hed

DEFAULT_THUMBNAIL_SIDE = 2048
# The colour and texture rules hold at thumbnail scale: at finer pixels single eosin fibres look like red ink and
# detail measures change (the sample slide's tissue fraction falls from 0.31 at 1.5 um/px to 0.05 at 0.7).
MASK_MIN_UM_PER_PX = 4.0


@dataclass(frozen=True)
class TissueParams:
    """Thresholds of `tissue_mask`. Colours are in 0..1, hues in degrees, sizes as fractions of the image."""

    min_chroma: float = 0.07  # below: white or grey background (stain chroma is >= ~0.1, IHC's pale blue too)
    max_bright_chroma: float = 0.10  # very bright pixels need more colour than this to count (faint haze)
    bright_value: float = 0.92
    black_value: float = 0.20  # darker than this: black pen, folds, slide-edge shadows
    dark_value: float = 0.35  # darker than this and colourless: black/grey pen
    dark_max_chroma: float = 0.12
    red_pen_hue: tuple[float, float] = (347.0, 30.0)  # red/orange band (wraps at 0); eosin sits at ~330-346
    red_pen_min_chroma: float = 0.35
    cold_pen_hue: tuple[float, float] = (65.0, 255.0)  # green, cyan and blue: never H&E stain
    cold_pen_min_saturation: float = 0.28  # IHC haematoxylin is blue but pale (saturation ~0.15-0.25)
    green_hue: tuple[float, float] = (65.0, 195.0)  # green/cyan of any strength is never stain
    pen_rim_hue: tuple[float, float] = (335.0, 40.0)  # the faded rims of red ink: reddish...
    pen_rim_max_texture: float = 0.004  # ...and smooth (ink is out of the focal plane; tissue has texture)
    pen_rim: float = 0.03  # how far (fraction of the longer side) a pen mark grows into its smooth rim
    pen_margin: float = 0.004  # then every pen mask grows by this fraction of the longer side
    min_texture: float = 0.0015  # fine detail below which a pixel counts as blurred (0: no blur test)
    texture_window: int = 9
    min_object: float = 2e-4  # connected pieces smaller than this fraction of the image are specks
    max_hole: float = 2e-3  # holes up to this fraction of the image are filled

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            vals = v if isinstance(v, tuple) else (v,)
            if not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in vals):
                raise UsageError(f"tissue parameter {f.name} must be a non-negative number, got {v!r}")

    @classmethod
    def from_kwargs(cls, params: dict) -> TissueParams:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise UsageError(f"unknown tissue parameter(s) {unknown}; valid: {sorted(names)}")
        return cls(**params)

    def as_dict(self) -> dict:
        return asdict(self)


def tissue_mask(rgb: np.ndarray, **params) -> np.ndarray:
    """A bool H x W mask of stained tissue in an H x W x 3 (or 4) uint8 image, usually a slide thumbnail.

    `params` override fields of `TissueParams` (or pass `params=TissueParams(...)`).
    """
    p = params.pop("params", None) or TissueParams()
    if params:
        p = TissueParams.from_kwargs({**p.as_dict(), **params})
    img = _as_rgb_float(rgb)
    if img.shape[0] == 0 or img.shape[1] == 0:
        return np.zeros(img.shape[:2], dtype=bool)
    hue, chroma, value = _hcv(img)
    sat = chroma / np.maximum(value, 1e-6)
    stained = (chroma >= p.min_chroma) & ~((value >= p.bright_value) & (chroma < p.max_bright_chroma))
    dark = (value < p.black_value) | ((value < p.dark_value) & (chroma < p.dark_max_chroma))
    texture = _detail(img.mean(axis=2), p.texture_window)
    pen = _pen(hue, chroma, sat, texture, value, p)
    mask = stained & ~dark & ~pen & ~_in_band(hue, p.green_hue)
    if p.min_texture > 0:
        mask &= texture >= p.min_texture
    return _clean(mask, p)


def tissue_fraction(mask: np.ndarray, box: tuple[float, float, float, float] | None = None) -> float:
    """The tissue fraction of `mask`, or of the part of `box` = (x, y, w, h) in mask pixels inside it.

    Partial pixels at the box edges count by their covered area, so small boxes on a coarse mask are fair.
    """
    m = np.asarray(mask, dtype=bool)
    if box is None:
        return float(m.mean()) if m.size else 0.0
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        return 0.0
    wx = _coverage(x, x + w, m.shape[1])
    wy = _coverage(y, y + h, m.shape[0])
    total = w * h  # area outside the mask (beyond the slide edge) counts as background
    if not wx[1].size or not wy[1].size:
        return 0.0
    sub = m[wy[0] : wy[0] + wy[1].size, wx[0] : wx[0] + wx[1].size]
    return float(wy[1] @ sub @ wx[1]) / total


@dataclass(frozen=True)
class SlideTissue:
    """A slide's tissue mask, the thumbnail it was computed on, and level-0 pixels per mask pixel."""

    mask: np.ndarray  # (h, w) bool
    thumbnail: np.ndarray  # (h, w, 3) uint8
    scale: float

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def slide_tissue(slide, max_side: int = DEFAULT_THUMBNAIL_SIDE, **params) -> SlideTissue:
    """The one way a slide's tissue is found (`info`, `predict`, `extract` and training all call this).

    The thumbnail is read from the slide at `mask_side` (its longer side `max_side`, or less when that would
    make its pixels finer than MASK_MIN_UM_PER_PX), never derived from another thumbnail: resampling twice
    softens dense lymphoid tissue until it falls under the colour rules.
    """
    thumb = slide.thumbnail(mask_side(slide, max_side))
    w0, h0 = slide.dimensions
    scale = max(w0 / thumb.shape[1], h0 / thumb.shape[0])
    return SlideTissue(tissue_mask(thumb, **params), thumb, float(scale))


def slide_tissue_mask(slide, max_side: int = DEFAULT_THUMBNAIL_SIDE, **params) -> tuple[np.ndarray, float]:
    """(mask, scale) of `slide_tissue`: the tissue mask and level-0 pixels per mask pixel."""
    t = slide_tissue(slide, max_side, **params)
    return t.mask, t.scale


def mask_side(slide, max_side: int = DEFAULT_THUMBNAIL_SIDE) -> int:
    """The thumbnail side for a tissue mask: `max_side`, capped so that pixels are >= MASK_MIN_UM_PER_PX."""
    if slide.mpp is None:
        return max_side
    extent_um = max(slide.dimensions) * slide.mpp
    return int(min(max_side, max(64, math.ceil(extent_um / MASK_MIN_UM_PER_PX))))


# ---- pieces ----------------------------------------------------------------------------------------------
def _as_rgb_float(rgb: np.ndarray) -> np.ndarray:
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise UsageError(f"tissue_mask needs an H x W x 3 RGB image, got shape {a.shape}")
    if a.shape[2] == 4:  # transparent pixels are background
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        f = a[..., :3].astype(np.float32) / 255.0 * alpha + (1.0 - alpha)
    else:
        f = a.astype(np.float32)
        if a.dtype == np.uint8:
            f /= 255.0
    return f


def _hcv(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), chroma and value, all from max/min of R, G, B."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    mx, mn = img.max(axis=2), img.min(axis=2)
    c = mx - mn
    safe = np.where(c > 0, c, 1.0)
    h = np.where(
        mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    return np.where(c > 0, h * 60.0, 0.0), c, mx


def _in_band(hue: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    lo, hi = band
    if lo <= hi:
        return (hue >= lo) & (hue < hi)
    return (hue >= lo) | (hue < hi)  # the band wraps through 0 (red)


def _pen(hue, chroma, sat, texture, value, p: TissueParams) -> np.ndarray:
    """Ink: strongly coloured seeds, grown a bounded distance through their smooth reddish or dark rims."""
    red = _in_band(hue, p.red_pen_hue) & (chroma >= p.red_pen_min_chroma)
    cold = _in_band(hue, p.cold_pen_hue) & (sat >= p.cold_pen_min_saturation) & (chroma >= p.min_chroma)
    pen = red | cold
    if not pen.any():
        return pen
    side = max(pen.shape)
    # Blurred ink fades into pale pink or dark maroon that no colour rule can tell from stain; its smoothness
    # and its contact with unmistakable ink can.
    rim = (_in_band(hue, p.pen_rim_hue) | (value < 0.5)) & (texture < p.pen_rim_max_texture)
    steps = round(p.pen_rim * side)
    if steps > 0 and rim.any():
        pen = ndi.binary_dilation(pen, iterations=steps, mask=pen | rim)
    margin = round(p.pen_margin * side)
    if margin > 0:
        pen = ndi.binary_dilation(pen, structure=_disk(margin))
    return pen


def _detail(gray: np.ndarray, window: int) -> np.ndarray:
    """Local mean of the finest detail (grey minus its 1-px blur): low on smooth ink and out-of-focus smears.

    Unlike a local std it ignores smooth gradients, such as the fading rim of a blurred stroke.
    """
    fine = np.abs(gray - ndi.gaussian_filter(gray, 1.0))
    return ndi.uniform_filter(fine, window)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx * xx + yy * yy <= radius * radius


def _clean(mask: np.ndarray, p: TissueParams) -> np.ndarray:
    """Drop specks, fill small holes (lumens and fat cells stay when large)."""
    area = mask.size
    min_obj = max(1, round(p.min_object * area))
    if mask.any() and min_obj > 1:
        labels, n = ndi.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_obj
        keep[0] = False
        mask = keep[labels]
    max_hole = round(p.max_hole * area)
    if max_hole > 0:
        holes, n = ndi.label(~mask)
        if n:
            sizes = np.bincount(holes.ravel(), minlength=n + 1)
            # Background touching the image border is never a hole.
            border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
            fill = sizes <= max_hole
            fill[0] = False
            fill[border] = False
            mask = mask | fill[holes]
    return mask


def _coverage(lo: float, hi: float, n: int) -> tuple[int, np.ndarray]:
    """First index and per-pixel overlap lengths of the interval [lo, hi) with pixels 0..n-1."""
    a, b = max(lo, 0.0), min(hi, float(n))
    if a >= b:
        return 0, np.zeros(0)
    i0, i1 = math.floor(a), math.ceil(b)
    edges = np.arange(i0, i1 + 1, dtype=np.float64)
    left = np.maximum(edges[:-1], a)
    right = np.minimum(edges[1:], b)
    return i0, np.maximum(right - left, 0.0)
