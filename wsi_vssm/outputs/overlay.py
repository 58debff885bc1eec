"""`overlay.png`: the heatmap over the slide thumbnail, made to be read by a pathologist.

The colour rule is the one in `wsi_vssm.outputs.colors` (shared with the napari layer): cells below the cell
threshold are not tinted at all, so the morphology shows as scanned; at and above it a perceptual colour map,
its opacity rising with the probability. Tumour outlines are drawn on top. A title line names the slide and the
call; a warning line under it (an out-of-domain slide's) is bold and red, so that it is not read past; a legend
under the image (text at least 1.5% of the image height) shows the colour scale and marks the cell threshold.
Optionally the plain thumbnail sits on the left for comparison. A slide without tissue gets the thumbnail with
"no tissue found" (or the reason no cell was scored) across it.

It receives only the thumbnail's pixels: label and macro images never reach it. The image panels are placed
pixel for pixel (`figimage`), never resampled, so an untinted pixel is exactly the thumbnail's.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wsi_vssm.atomic import atomic_write_bytes
from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.colors import (
    ALPHA_AT_ONE,
    CONTRAST_LIMITS,
    HEATMAP_CMAP,
    check_threshold,
    colormap,
    heatmap_rgba,
)
from wsi_vssm.outputs.heatmap import _grid, _pair, _positive

DPI = 100
FONT_FRACTION = 0.021  # legend and title font size (em, px) as a fraction of the thumbnail height
MIN_FONT_PX = 14
CONTOUR_RGB = (0, 0, 0)  # outlines in black: visible on H&E and on every colour of the map
NO_TISSUE_TEXT = "no tissue found"
NO_CELL_NOTE = "no cell was scored"
WARNING_RGB = (0.72, 0.0, 0.0)  # dark red: stands out from the black title, legible on white


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
    alpha: float = ALPHA_AT_ONE,
    cmap: str = HEATMAP_CMAP,
    *,
    cell_threshold: float = 0.5,
    title: str | None = None,
    contours: Sequence | None = None,
    side_by_side: bool = False,
    warning: str | None = None,
    no_tissue_text: str = NO_TISSUE_TEXT,
) -> None:
    """Write the overlay of `prob` on `thumbnail_rgb` to `path` as PNG, atomically. See `overlay_figure`. The
    PNG's text chunks `wsi_vssm.panel` and `wsi_vssm.level0_px_per_px` say where the overlay panel lies in it and
    its scale, so that a pixel can be mapped back to the slide (docs/outputs.md)."""
    fig, lay = _overlay(
        thumbnail_rgb, prob, cell0, origin, slide_dims, alpha, cmap,
        cell_threshold=cell_threshold, title=title, contours=contours, side_by_side=side_by_side, warning=warning,
        no_tissue_text=no_tissue_text,
    )  # fmt: skip
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()  # x, y, width, height of the panel; level-0 px per panel px along x and y
    info.add_text("wsi_vssm.panel", f"{lay.panel_x} {lay.title_h} {lay.panel_w} {lay.panel_h}")
    info.add_text("wsi_vssm.level0_px_per_px", f"{slide_dims[0] / lay.panel_w:.10g} {slide_dims[1] / lay.panel_h:.10g}")

    fig.canvas.draw()
    # RGB, not matplotlib's RGBA: the figure is opaque, and the alpha channel cost 11% of the file and 3x the
    # encoding time (7.5 -> 6.7 MB, 1.2 -> 0.4 s for a 2,048 px sample overlay)
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


def overlay_figure(
    thumbnail_rgb: np.ndarray,
    prob: np.ndarray,
    cell0: float,
    origin: tuple[float, float],
    slide_dims: tuple[int, int],
    alpha: float = ALPHA_AT_ONE,
    cmap: str = HEATMAP_CMAP,
    *,
    cell_threshold: float = 0.5,
    title: str | None = None,
    contours: Sequence | None = None,
    side_by_side: bool = False,
    warning: str | None = None,
    no_tissue_text: str = NO_TISSUE_TEXT,
):
    """The overlay as a matplotlib `Figure` on an Agg canvas, one figure pixel per thumbnail pixel.

    `thumbnail_rgb` is the whole slide (H x W x 3 uint8), `prob` the (rows, cols) cell grid (NaN = no tissue)
    whose cell (0, 0) starts at level-0 `origin`, cells `cell0` level-0 px wide, on a slide of level-0
    `slide_dims` (width, height). `alpha` is the opacity at probability 1, `cmap` a matplotlib colour map over
    the fixed limits [0, 1]. `title` is one line shown above the image; `contours` are polygons in level-0 px
    ((N, 2) arrays of x, y, or shapely polygons) drawn as outlines; `side_by_side` puts the plain thumbnail on
    the left. `warning` is one more line under the title, bold and red (predict: an out-of-domain slide's
    reasons); `no_tissue_text` is written across a grid without cells. Bad arguments raise UsageError.
    """
    return _overlay(thumbnail_rgb, prob, cell0, origin, slide_dims, alpha, cmap, cell_threshold=cell_threshold,
                    title=title, contours=contours, side_by_side=side_by_side, warning=warning,
                    no_tissue_text=no_tissue_text)[0]


def _overlay(thumbnail_rgb, prob, cell0, origin, slide_dims, alpha, cmap, *, cell_threshold, title, contours,
             side_by_side, warning=None, no_tissue_text=NO_TISSUE_TEXT):
    """`overlay_figure`'s figure and its layout."""
    texts = (title, warning, no_tissue_text)
    title, warning, no_tissue_text = (_drawable(t) if isinstance(t, str) else t for t in texts)  # else refused below
    # The Agg canvas directly, not pyplot: no global backend switch, no figure registry, safe in threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    thumb = _enlarged(_check_thumbnail(thumbnail_rgb))
    threshold = _check_options(cell_threshold, alpha, cmap, title)
    _check_line(warning, "warning")
    _check_line(no_tissue_text or None, "no_tissue_text")
    no_tissue_text = no_tissue_text or NO_TISSUE_TEXT
    grid = _grid(prob)
    h, w = thumb.shape[:2]
    heat = heatmap_on_grid(grid, cell0, origin, slide_dims, (h, w))
    tissue = bool(np.isfinite(grid).any())
    panel = tint(thumb, heat, threshold, alpha, cmap)
    if contours:
        scale = (w / float(slide_dims[0]), h / float(slide_dims[1]))
        panel = draw_outlines(panel, contours, scale, width=max(2, round(h / 400)))

    lay = _Layout.make(h, w, side_by_side, title, tissue, warning, no_tissue_text)
    # a quarter pixel over: matplotlib before 3.11.1 truncates figsize x dpi (a 201 px panel came out 200 px,
    # 1 px off what the PNG's panel text says), later ones round it
    fig = Figure(figsize=((lay.width + 0.25) / DPI, (lay.height + 0.25) / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    img_bottom = lay.height - lay.title_h - h  # figimage offsets are from the lower-left corner
    if side_by_side:
        _place(fig, thumb, 0, img_bottom)
    _place(fig, panel, lay.panel_x, img_bottom)
    line_h = lay.title_h - lay.warning_h
    if title is not None:
        fig.text(lay.pad / lay.width, 1 - line_h / 2 / lay.height, title, fontsize=lay.title_px * 72 / DPI,
                 va="center", ha="left", parse_math=False)  # fmt: skip
    for i, line in enumerate(lay.warning_lines):
        fig.text(lay.pad / lay.width, 1 - (line_h + (i + 0.5) * 1.3 * lay.font_px) / lay.height, line,
                 fontsize=lay.font_pt, fontweight="bold", color=WARNING_RGB, va="center", ha="left",
                 parse_math=False)  # fmt: skip
    if tissue:
        _draw_legend(fig, lay, threshold, alpha, cmap, bool(contours))
    else:
        _draw_no_tissue(fig, lay, img_bottom + h / 2, no_tissue_text)
    return fig, lay


STRIP_ROWS = 256


def _place(fig, img: np.ndarray, xo: int, yo: int) -> None:
    """`img` on `fig` pixel for pixel, its lower-left corner at (xo, yo), in strips of STRIP_ROWS rows: matplotlib
    makes float copies of an image as it draws it (570 MB for a 2,100 x 2,542 thumbnail, the peak of a small
    slide's whole run), so strips bound that to a strip's share. The pixels are the same."""
    h = img.shape[0]
    for top in range(0, h, STRIP_ROWS):
        strip = img[top:top + STRIP_ROWS]
        fig.figimage(strip, xo=xo, yo=yo + h - top - strip.shape[0], origin="upper")


SMALL_THUMBNAIL_PX, ENLARGED_PX = 128, 256


def _enlarged(thumb: np.ndarray) -> np.ndarray:
    """A thumbnail under SMALL_THUMBNAIL_PX a side (a tiny slide: 16 px for the DICOM fixture) repeated in whole
    pixels to about ENLARGED_PX, so that the image, its title and the legend or "no tissue" note stay legible."""
    k = math.ceil(ENLARGED_PX / max(thumb.shape[:2])) if max(thumb.shape[:2]) < SMALL_THUMBNAIL_PX else 1
    return thumb if k == 1 else np.repeat(np.repeat(thumb, k, axis=0), k, axis=1)


def tint(thumb: np.ndarray, heat: np.ndarray, threshold: float, alpha: float = ALPHA_AT_ONE,
         cmap: str = HEATMAP_CMAP) -> np.ndarray:  # fmt: skip
    """`thumb` (H x W x 3 uint8) with the colour rule applied for the per-pixel probabilities `heat` (H x W).

    Pixels whose probability is below `threshold` or NaN are returned unchanged, bit for bit.
    """
    heat = np.asarray(heat, dtype=np.float32)
    hot = np.nan_to_num(heat, nan=-1.0) >= check_threshold(threshold)  # the only pixels that change
    rgba = heatmap_rgba(heat[hot], threshold, cmap, alpha_max=alpha)  # (n, 4)
    a = rgba[:, 3:4]
    out = thumb.copy()
    out[hot] = np.clip(np.rint(thumb[hot] * (1.0 - a) + rgba[:, :3] * 255.0 * a), 0, 255).astype(np.uint8)
    return out


def draw_outlines(img: np.ndarray, polygons: Sequence, scale: tuple[float, float], width: int = 3) -> np.ndarray:
    """A copy of `img` (H x W x 3 uint8) with each polygon's rings drawn as closed lines.

    `polygons` are in level-0 px: (N, 2) arrays of (x, y), or shapely polygons (holes drawn too); `scale` maps
    level-0 px to image px (sx, sy).
    """
    from PIL import Image, ImageDraw

    sx, sy = scale
    out = Image.fromarray(np.ascontiguousarray(img[..., :3]))
    draw = ImageDraw.Draw(out)
    for ring in _rings(polygons):
        xy = [(x * sx, y * sy) for x, y in ring]  # PIL: (0, 0) is the top-left corner of a pixel
        draw.line([*xy, xy[0]], fill=CONTOUR_RGB, width=width, joint="curve")
    return np.asarray(out)


def _rings(polygons: Sequence) -> list[np.ndarray]:
    if isinstance(polygons, np.ndarray) and polygons.ndim == 2:
        polygons = [polygons]  # a single polygon passed bare
    rings = []
    for k, poly in enumerate(polygons):
        parts = [poly.exterior, *poly.interiors] if hasattr(poly, "exterior") else [poly]
        for part in parts:
            try:
                ring = np.asarray(getattr(part, "coords", part), dtype=np.float64)
            except (TypeError, ValueError):
                raise UsageError(f"contour {k} must be an (N, 2) array of x, y level-0 px") from None
            if ring.ndim != 2 or ring.shape[1] != 2 or len(ring) < 2 or not np.isfinite(ring).all():
                raise UsageError(f"contour {k} must be an (N, 2) array of finite x, y, got shape {ring.shape}")
            rings.append(ring)
    return rings


def _check_options(cell_threshold, alpha, cmap, title) -> float:
    """Fail before any work on a bad option; returns the threshold as a float."""
    threshold = check_threshold(cell_threshold)
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha <= 1):
        raise UsageError(f"alpha must be in (0, 1], got {alpha!r}")
    colormap(cmap)
    _check_line(title, "title")
    return threshold


def _check_line(text, what: str) -> None:
    if text is not None and (not isinstance(text, str) or "\n" in text or "\r" in text):
        raise UsageError(f"{what} must be one line of text, got {text!r}")


def _check_thumbnail(thumbnail_rgb) -> np.ndarray:
    thumb = np.asarray(thumbnail_rgb)
    if thumb.ndim != 3 or thumb.shape[2] < 3 or thumb.dtype != np.uint8 or 0 in thumb.shape[:2]:
        raise UsageError(f"thumbnail must be an H x W x 3 uint8 image, got {thumb.dtype} {thumb.shape}")
    return np.ascontiguousarray(thumb[..., :3])


@dataclass(frozen=True)
class _Layout:
    """Where everything goes, in figure pixels (y down from the top unless said otherwise)."""

    font_px: float
    title_px: float
    pad: int
    title_h: int  # the whole band above the image: the title line and the warning line
    legend_h: int
    panel_x: int  # left edge of the overlay panel
    panel_w: int
    width: int
    height: int
    bar_w: int
    label_w: float  # width of the "tumour probability" label left of the colour bar
    warning_h: int = 0
    warning_lines: tuple[str, ...] = ()  # the warning, wrapped to the image width, in bold at font_px

    @property
    def panel_h(self) -> int:
        """The overlay panel's height (the thumbnail's), between the title band and the legend."""
        return self.height - self.title_h - self.legend_h

    @property
    def font_pt(self) -> float:
        """The legend's font size in points (`font_px` at `DPI`)."""
        return self.font_px * 72 / DPI

    @classmethod
    def make(cls, h: int, w: int, side_by_side: bool, title: str | None, tissue: bool,
             warning: str | None = None, no_tissue_text: str = NO_TISSUE_TEXT) -> _Layout:  # fmt: skip
        f = max(MIN_FONT_PX, round(FONT_FRACTION * h))
        pad = round(0.6 * f)
        title_h = round(1.8 * f) if title is not None else 0
        legend_h = round((5.4 if tissue else 1.8) * f)
        panel_x = w + pad if side_by_side else 0
        label_w = _text_width(LEGEND_LABEL, f)
        bar_w = round(max(12 * f, min(24 * f, 0.45 * w)))
        widths = [panel_x + w]
        if tissue:
            widths += [panel_x + pad + label_w + f + bar_w + 2 * f, panel_x + 2 * pad + _text_width(_NOTE_MAX, f)]
        else:  # the legend band's line, and room for the large text on a sliver of a slide
            widths.append(panel_x + 2 * pad + _text_width(f"{no_tissue_text}: {NO_CELL_NOTE}", f))
        title_px = f
        if title is not None:  # shrink a long title to the image width, to 0.7 of the legend font at most
            title_px = max(0.7 * f, min(f, 0.98 * f * (max(widths) - 2 * pad) / _text_width(title, f)))
            widths.append(2 * pad + _text_width(title, title_px))
        width = math.ceil(max(widths))
        warning_lines = () if warning is None else _wrapped(warning, f, width - 2 * pad)  # never widens the image
        warning_h = round((len(warning_lines) * 1.3 + 0.4) * f) if warning_lines else 0
        title_h += warning_h
        return cls(f, title_px, pad, title_h, legend_h, panel_x, w, width, h + title_h + legend_h, bar_w, label_w,
                   warning_h, warning_lines)


LEGEND_LABEL = "tumour probability"
_NOTE_MAX = "not tinted below the cell threshold 0.000" + " " * 8 + "tumour outline"


def _drawable(text: str) -> str:
    """`text` with each character the font has no glyph for (a CJK slide name, with matplotlib's DejaVu Sans)
    as "?": matplotlib would draw an empty box and warn once per character on every slide."""
    from matplotlib.font_manager import FontProperties, findfont
    from matplotlib.ft2font import FT2Font

    if text.isascii():
        return text
    font = FT2Font(findfont(FontProperties()))
    return "".join(c if c.isascii() or font.get_char_index(ord(c)) else "?" for c in text)


def _text_width(text: str, font_px: float, bold: bool = False) -> float:
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    renderer = RendererAgg(8, 8, DPI)
    font = FontProperties(size=font_px * 72 / DPI, weight="bold" if bold else "normal")
    width, _, _ = renderer.get_text_width_height_descent(text, font, ismath=False)
    return float(width)


MAX_WARNING_LINES = 4  # a fluorescence slide's two domain notes take 3 to 4 lines on a 2,048 px overlay


def _wrapped(text: str, font_px: float, max_w: float) -> tuple[str, ...]:
    """`text` in bold broken into lines of at most `max_w` px, at spaces (inside a word only when the word alone
    is wider, e.g. a long path), MAX_WARNING_LINES at most: the last ends in "..." when the text does not fit."""
    def fits(s: str) -> bool:
        return _text_width(s, font_px, bold=True) <= max_w

    # no line holds more than max_w / (0.25 em) characters: what lies beyond MAX + 1 such lines is never shown
    text = text[: (MAX_WARNING_LINES + 1) * math.ceil(max_w / (0.25 * font_px))]
    lines: list[str] = []
    for word in text.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] += f" {word}"
            continue
        while not fits(word) and len(word) > 1 and len(lines) <= MAX_WARNING_LINES:
            lo, hi = 1, len(word) - 1  # the longest head that fits (at least one character) gets a line
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits(word[:mid]) else (lo, mid - 1)
            lines.append(word[:lo])
            word = word[lo:]
        lines.append(word)
        if len(lines) > MAX_WARNING_LINES:  # enough to know the text does not fit
            break
    if len(lines) > MAX_WARNING_LINES:
        last = lines[MAX_WARNING_LINES - 1]
        while len(last) > 1 and not fits(last + " ..."):
            last = last.rsplit(" ", 1)[0] if " " in last else last[:-1]
        lines = [*lines[: MAX_WARNING_LINES - 1], last + " ..."]
    return tuple(lines)


def _legend_bar(threshold: float, alpha: float, cmap: str, bar_w: int, bar_h: int) -> np.ndarray:
    """The colour scale as pixels: the colour rule over a light checkerboard (transparency), black frame."""
    check = 8 * ((np.arange(bar_h)[:, None] // 6 + np.arange(bar_w)[None, :] // 6) % 2)
    base = np.repeat((247 - check).astype(np.uint8)[..., None], 3, axis=2)
    values = (np.arange(bar_w) + 0.5) / bar_w
    bar = tint(base, np.broadcast_to(values, (bar_h, bar_w)), threshold, alpha, cmap)
    bar[[0, -1], :] = 0
    bar[:, [0, -1]] = 0
    return bar


def _draw_legend(fig, lay: _Layout, threshold: float, alpha: float, cmap: str, outlined: bool) -> None:
    from matplotlib.lines import Line2D

    f, W, H = lay.font_px, lay.width, lay.height
    text = {"fontsize": lay.font_pt, "parse_math": False}
    bar_h = round(1.1 * f)
    bar_top = H - lay.legend_h + round(0.7 * f)  # y down
    bar_x = lay.panel_x + lay.pad + round(lay.label_w + f)
    fig.figimage(_legend_bar(threshold, alpha, cmap, lay.bar_w, bar_h), xo=bar_x, yo=H - bar_top - bar_h,
                 origin="upper")  # fmt: skip
    mid = 1 - (bar_top + bar_h / 2) / H
    fig.text((bar_x - f) / W, mid, LEGEND_LABEL, ha="right", va="center", **text)
    lo, hi = CONTRAST_LIMITS
    tick_y = 1 - (bar_top + bar_h + 0.25 * f) / H
    for v in np.linspace(lo, hi, 5):
        if abs(v - threshold) >= 0.12 or v == threshold:
            fig.text((bar_x + v * lay.bar_w) / W, tick_y, f"{v:g}", ha="center", va="top", **text)
    tx = (bar_x + threshold * lay.bar_w) / W
    fig.add_artist(Line2D([tx, tx], [1 - (bar_top - 0.35 * f) / H, 1 - (bar_top + bar_h + 0.2 * f) / H],
                          color="black", linewidth=max(2, f / 10) * 72 / DPI, transform=fig.transFigure))  # fmt: skip
    if abs(threshold - round(threshold * 4) / 4) > 1e-9:
        fig.text(tx, tick_y, f"{threshold:.3f}", ha="center", va="top", fontweight="bold", **text)
    note_y = 1 - (bar_top + bar_h + 2.3 * f) / H
    x = (lay.panel_x + lay.pad) / W
    note = f"not tinted below the cell threshold {threshold:.3f}"
    fig.text(x, note_y, note, ha="left", va="top", **text)
    if outlined:
        x = (lay.panel_x + lay.pad + _text_width(note, f) + 2 * f) / W
        y = note_y - 0.55 * f / H
        fig.add_artist(Line2D([x, x + 1.6 * f / W], [y, y], color=np.array(CONTOUR_RGB) / 255,
                              linewidth=max(2, f / 12) * 72 / DPI, transform=fig.transFigure))  # fmt: skip
        fig.text(x + 2.1 * f / W, note_y, "tumour outline", ha="left", va="top", **text)


def _draw_no_tissue(fig, lay: _Layout, centre_y: float, text: str = NO_TISSUE_TEXT) -> None:
    """Draw `text` ("no tissue found") in large type across the overlay panel, and once more in the legend band."""
    f, W, H = lay.font_px, lay.width, lay.height
    panel_w, panel_h = lay.panel_w, lay.panel_h
    # large, but never wider than the panel (bold type is about 0.55 em a character) nor its box taller, and
    # never below the legend's size: on a sliver of a slide (64 x 4,000 px) it would be a smudge; on a panel
    # too low for that, only the legend band's line says it
    big_px = max(f, min(0.8 * panel_w / (0.55 * len(text)), 0.6 * panel_h, max(2 * f, 0.12 * panel_h)))
    if 0.6 * panel_h >= f:
        half = (0.55 * len(text) + 0.8) * big_px / 2 + lay.pad  # with the box; kept inside the image
        x = min(max(lay.panel_x + panel_w / 2, half), W - half) if 2 * half < W else W / 2
        fig.text(x / W, centre_y / H, text, ha="center", va="center",
                 fontsize=big_px * 72 / DPI, fontweight="bold", color="black", parse_math=False,
                 bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "black", "boxstyle": "round,pad=0.4"})
    fig.text((lay.panel_x + lay.pad) / W, 1 - (H - lay.legend_h / 2) / H, f"{text}: {NO_CELL_NOTE}",
             ha="left", va="center", fontsize=lay.font_pt, parse_math=False)  # fmt: skip
