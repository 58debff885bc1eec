"""overlay.png and the heatmap colour rule: transparent below the cell threshold, readable legend, outlines."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.colors import (
    ALPHA_AT_ONE,
    ALPHA_AT_THRESHOLD,
    HEATMAP_CMAP,
    heatmap_alpha,
    heatmap_lut,
    heatmap_rgba,
)
from wsi_vssm.outputs.overlay import NO_TISSUE_TEXT, overlay_figure, overlay_png

SLIDE = (1600, 1000)  # level-0 (width, height); the thumbnail below is 10x smaller, one cell = 10 x 10 px
CELL0 = 100.0


@pytest.fixture
def thumb() -> np.ndarray:
    """Noise, so that any resampling or blending of an untinted pixel shows."""
    return np.random.default_rng(0).integers(0, 256, (100, 160, 3), dtype=np.uint8)


@pytest.fixture
def prob() -> np.ndarray:
    p = np.full((10, 16), np.nan, np.float32)  # no tissue by default
    p[1:9, 1:8] = 0.2  # tissue, low probability
    p[2:5, 3:6] = 0.9  # hot
    p[6:8, 10:14] = 0.49  # just below the threshold
    return p


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _text_heights(fig) -> dict[str, float]:
    renderer = fig.canvas.get_renderer()
    return {t.get_text(): t.get_window_extent(renderer).height for t in fig.texts if t.get_text()}


# ---- the colour rule -----------------------------------------------------------------------------------------
def test_colour_rule_transparent_below_threshold_alpha_rising_above():
    p = np.array([np.nan, 0.0, 0.3, 0.499, 0.5, 0.75, 1.0], np.float32)
    rgba = heatmap_rgba(p, 0.5)
    assert rgba.shape == (7, 4) and (rgba[:4, 3] == 0).all()
    assert rgba[4, 3] == pytest.approx(ALPHA_AT_THRESHOLD) and rgba[6, 3] == pytest.approx(ALPHA_AT_ONE)
    assert np.all(np.diff(rgba[4:, 3]) > 0)
    # Fixed contrast limits: a probability has the same colour whatever the threshold.
    assert np.allclose(heatmap_rgba(p, 0.2)[5, :3], rgba[5, :3])
    from matplotlib import colormaps

    assert np.allclose(rgba[5, :3], colormaps[HEATMAP_CMAP](0.75)[:3], atol=1e-2)
    assert heatmap_alpha(p, 0.5, alpha_max=0.5)[6] == pytest.approx(0.5)


def test_lut_steps_to_transparent_exactly_at_the_threshold():
    controls, colors = heatmap_lut(0.677)
    assert np.all(np.diff(controls) > 0) and controls[0] == 0 and controls[-1] == 1
    assert colors.shape == (len(controls), 4)
    k = int(np.searchsorted(controls, 0.677))
    assert colors[k - 1, 3] == 0 and colors[k, 3] > 0 and (colors[:k, 3] == 0).all()


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "0.5", None, True])
def test_colour_rule_rejects_bad_thresholds(bad):
    with pytest.raises(UsageError, match="threshold"):
        heatmap_rgba(np.zeros(3), bad)


# ---- overlay.png ---------------------------------------------------------------------------------------------
def test_below_threshold_is_exactly_the_thumbnail_and_above_is_tinted(tmp_path, thumb, prob):
    path = tmp_path / "overlay.png"
    overlay_png(path, thumb, prob, CELL0, (0, 0), SLIDE, cell_threshold=0.5)
    img = _png(path)
    assert img.shape[0] > 100 and img.shape[1] >= 160  # the thumbnail plus a legend band
    panel = img[:100, :160]
    cells = np.kron(np.nan_to_num(prob, nan=-1), np.ones((10, 10)))  # probability per thumbnail pixel
    below = cells < 0.5
    assert (panel[below] == thumb[below]).all()  # bit for bit: no dark or grey veil over low probability
    assert (panel[~below] != thumb[~below]).any(axis=-1).mean() > 0.9
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.png"]  # atomic: no temporary left
    assert Image.open(path).mode == "RGB"  # opaque: no alpha channel to store


def test_opacity_rises_with_probability(tmp_path):
    thumb = np.full((100, 160, 3), 255, np.uint8)
    prob = np.zeros((10, 16), np.float32)
    prob[:, 8:] = 0.6
    prob[:, 12:] = 1.0
    path = tmp_path / "o.png"
    overlay_png(path, thumb, prob, CELL0, (0, 0), SLIDE, cmap="gray_r")  # grey: darker = more opaque ink
    img = _png(path).astype(int)
    assert (img[50, 40] == 255).all() and img[50, 100].sum() > img[50, 150].sum()


@pytest.mark.parametrize("h", [400, 2048])
def test_legend_text_is_at_least_1_5_percent_of_the_image_height(h):
    thumb = np.full((h, 120, 3), 230, np.uint8)
    prob = np.linspace(0, 1, 20, dtype=np.float32).reshape(20, 1)
    fig = overlay_figure(thumb, prob, 6.0, (0, 0), (120, h), cell_threshold=0.677, contours=[np.eye(2) * 50])
    heights = _text_heights(fig)
    total_h = fig.bbox.height
    assert "0.677" in heights and any("0.677" in k for k in heights if k != "0.677")  # the threshold is marked
    assert min(heights.values()) >= 0.015 * total_h, heights
    if h == 2048:
        assert min(heights.values()) >= 30


def test_title_line_sits_above_the_image(tmp_path, thumb, prob):
    title = "s.svs - probability 0.873 - tumour (slide threshold 0.677) - model default"
    fig = overlay_figure(thumb, prob, CELL0, (0, 0), SLIDE, title=title)
    assert title in _text_heights(fig)
    plain = overlay_figure(thumb, prob, CELL0, (0, 0), SLIDE)
    assert fig.bbox.height > plain.bbox.height
    path = tmp_path / "t.png"
    overlay_png(path, thumb, prob, CELL0, (0, 0), SLIDE, title=title)
    img = _png(path)
    # the title band's height (the figure is a quarter pixel over its pixel size: outputs.overlay); the image
    # lies just under it
    top = img.shape[0] - round(plain.bbox.height)
    below = np.kron(np.nan_to_num(prob, nan=-1), np.ones((10, 10))) < 0.5
    assert (img[int(top) : int(top) + 100, :160][below] == thumb[below]).all()


@pytest.mark.parametrize("side_by_side", [False, True])
def test_the_png_says_where_its_panel_lies_and_its_scale(tmp_path, thumb, prob, side_by_side):
    """A long title widens the canvas and shifts the image down by a title band of its own height: with nothing
    in the file to say where the panel lay, mapping an overlay pixel back to the slide was guesswork."""
    path = tmp_path / "o.png"
    overlay_png(path, thumb, prob, CELL0, (0, 0), SLIDE, title="a long title " * 8, side_by_side=side_by_side)
    with Image.open(path) as im:
        x, y, w, h = (int(v) for v in im.text["wsi_vssm.panel"].split())
        sx, sy = (float(v) for v in im.text["wsi_vssm.level0_px_per_px"].split())
    assert (w, h, sx, sy) == (160, 100, SLIDE[0] / 160, SLIDE[1] / 100) and y > 0
    panel = _png(path)[y : y + h, x : x + w]
    hot = np.kron(np.nan_to_num(prob, nan=-1) >= 0.5, np.ones((10, 10), bool))
    assert (panel[~hot] == thumb[~hot]).all() and (panel[hot] != thumb[hot]).any(axis=-1).all()


def test_side_by_side_shows_the_plain_thumbnail_beside(tmp_path, thumb, prob):
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    overlay_png(one, thumb, prob, CELL0, (0, 0), SLIDE)
    overlay_png(two, thumb, prob, CELL0, (0, 0), SLIDE, side_by_side=True)
    a, b = _png(one), _png(two)
    assert a.shape[0] == b.shape[0] and 1.8 * 160 <= b.shape[1] <= 2.2 * max(a.shape[1], 160)
    assert (b[:100, :160] == thumb).all()  # the left panel is the thumbnail untouched
    right = b[:100, b.shape[1] - a.shape[1] :][:, :160] if a.shape[1] == 160 else None
    assert right is None or (right != thumb).any()


def test_contours_are_drawn_as_outlines(tmp_path, thumb, prob):
    square = np.array([[300, 200], [600, 200], [600, 500], [300, 500]], float)  # level-0 px: cells 3-6, 2-5
    plain, lined = tmp_path / "plain.png", tmp_path / "lined.png"
    overlay_png(plain, thumb, prob, CELL0, (0, 0), SLIDE)
    overlay_png(lined, thumb, prob, CELL0, (0, 0), SLIDE, contours=[square])
    a, b = _png(plain)[:100, :160], _png(lined)[:100, :160]
    changed = (a != b).any(axis=-1)
    assert changed[19:21, 30:60].any(axis=0).all() and changed[20:50, 29:31].any(axis=1).all()  # the outline
    assert (b[20, 45] < 40).all()  # in black
    assert not changed[35, 45] and not changed[80, 120]  # inside and far outside: untouched
    import shapely.geometry

    shp = tmp_path / "shapely.png"
    overlay_png(shp, thumb, prob, CELL0, (0, 0), SLIDE, contours=[shapely.geometry.Polygon(square)])
    assert (_png(shp) == _png(lined)).all()


def test_no_tissue_writes_a_clear_png_that_says_so(tmp_path, thumb):
    path = tmp_path / "overlay.png"
    empty = np.full((10, 16), np.nan, np.float32)
    overlay_png(path, thumb, empty, CELL0, (0, 0), SLIDE, title="s.svs - no tissue found")
    img = _png(path)
    assert img.shape[0] > 100 and img.shape[1] >= 160
    assert (img[:10, :160] != 255).any()  # the thumbnail still shows (the title band is above it)
    fig = overlay_figure(thumb, empty, CELL0, (0, 0), SLIDE)
    heights = _text_heights(fig)
    assert heights[NO_TISSUE_TEXT] >= 0.05 * fig.bbox.height  # large
    assert not any("threshold" in k for k in heights)  # no colour scale for a heatmap that is not there


def test_a_tiny_slide_gets_a_legible_overlay(tmp_path):
    """A 16 px thumbnail (the DICOM fixture) gave a 66 px tall overlay whose "no tissue found" box, wider than
    the image, was clipped to "ue found"."""
    tiny = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    empty = np.full((2, 2), np.nan, np.float32)
    fig = overlay_figure(tiny, empty, 8.0, (0, 0), (16, 16), title="tiny")
    fig.canvas.draw()  # lays out the text's box
    note = next(t for t in fig.texts if t.get_text() == NO_TISSUE_TEXT)
    box = note.get_bbox_patch().get_window_extent(fig.canvas.get_renderer())
    image_w = 256  # 16 px repeated 16 times
    assert box.x0 >= 0 and box.x1 <= image_w, (box.x0, box.x1)
    path = tmp_path / "o.png"
    overlay_png(path, tiny, empty, 8.0, (0, 0), (16, 16), title="tiny")
    img = _png(path)
    assert img.shape[0] >= 256 and img.shape[1] >= 256


def test_keeps_the_old_positional_arguments(tmp_path, thumb, prob):
    overlay_png(tmp_path / "o.png", thumb, prob, CELL0, (0, 0), SLIDE, 0.6, "magma")
    assert _png(tmp_path / "o.png").shape[0] >= 100


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"cell_threshold": 1.5}, "threshold"),
        ({"cell_threshold": float("nan")}, "threshold"),
        ({"title": "two\nlines"}, "title"),
        ({"title": 3}, "title"),
        ({"contours": [np.zeros((3, 3))]}, "contour"),
        ({"contours": [np.array([[0, 0], [np.nan, 1]])]}, "contour"),
        ({"contours": [[["a", "b"], ["c", "d"]]]}, "contour"),
        ({"alpha": 0}, "alpha"),
        ({"cmap": "nope"}, "colour map"),
    ],
)
def test_bad_arguments_raise_usage_error(tmp_path, thumb, prob, change, match):
    with pytest.raises(UsageError, match=match):
        overlay_png(tmp_path / "o.png", thumb, prob, CELL0, (0, 0), SLIDE, **change)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.zeros((100, 160), np.uint8), np.zeros((10, 16)), CELL0, (0, 0), SLIDE), "thumbnail"),
        ((np.zeros((100, 160, 3), np.float32), np.zeros((10, 16)), CELL0, (0, 0), SLIDE), "thumbnail"),
        ((np.zeros((100, 160, 3), np.uint8), np.zeros(16), CELL0, (0, 0), SLIDE), "heatmap"),
        ((np.zeros((100, 160, 3), np.uint8), np.zeros((10, 16)), -1.0, (0, 0), SLIDE), "cell0"),
        ((np.zeros((100, 160, 3), np.uint8), np.zeros((10, 16)), CELL0, (0, 0), (0, 10)), "slide dimension"),
    ],
)
def test_bad_inputs_raise_usage_error(tmp_path, args, match):
    with pytest.raises(UsageError, match=match):
        overlay_png(tmp_path / "o.png", *args)


def test_a_title_the_font_cannot_draw_is_drawn_without_a_warning_per_character(tmp_path, thumb, prob):
    """A CJK slide name printed "Glyph 28107 missing from font(s) DejaVu Sans" once per character and slide."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = overlay_figure(thumb, prob, CELL0, (0, 0), SLIDE, title="\u6dcb\u5df4 lymfeknude \u00e6\u00f8\u00e5")
        fig.canvas.draw()
    assert "?? lymfeknude \u00e6\u00f8\u00e5" in _text_heights(fig)  # Latin letters the font has are kept


def test_a_warning_line_is_red_bold_and_wrapped_to_the_image(thumb):
    """An out-of-domain slide's overlay said so only in the plain black title; the warning line under it is bold
    and red, broken into lines that fit the image rather than widening it."""
    from wsi_vssm.outputs.overlay import MAX_WARNING_LINES, WARNING_RGB

    prob = np.full((10, 16), 0.9, np.float32)
    plain = overlay_figure(thumb, prob, CELL0, (0, 0), SLIDE, title="s")
    words = "out of the model's domain: tissue unlike the training data " * 4
    warned = overlay_figure(thumb, prob, CELL0, (0, 0), SLIDE, title="s", warning=words)
    assert warned.bbox.width == plain.bbox.width and warned.bbox.height > plain.bbox.height
    lines = [t for t in warned.texts if t.get_color() == WARNING_RGB]
    assert 2 <= len(lines) <= MAX_WARNING_LINES and all(t.get_fontweight() == "bold" for t in lines)
    warned.canvas.draw()
    renderer = warned.canvas.get_renderer()
    assert all(t.get_window_extent(renderer).x1 <= warned.bbox.width for t in lines)
    assert " ".join(t.get_text() for t in lines).split()[:4] == words.split()[:4]
    never = overlay_figure(thumb, prob, CELL0, (0, 0), SLIDE, title="s", warning="x " * 2000)
    shown = [t.get_text() for t in never.texts if t.get_color() == WARNING_RGB]
    assert len(shown) == MAX_WARNING_LINES and shown[-1].endswith("...")
    # a word wider than the image (a long path) is broken inside, not left to run off the edge
    path = overlay_figure(thumb, prob, CELL0, (0, 0), SLIDE, title="s", warning="/very/long/path" * 12 + " end")
    path.canvas.draw()
    parts = [t for t in path.texts if t.get_color() == WARNING_RGB]
    assert len(parts) >= 2 and all(t.get_window_extent(path.canvas.get_renderer()).x1 <= path.bbox.width
                                   for t in parts)


def test_the_no_tissue_text_can_say_why(thumb):
    empty = np.full((10, 16), np.nan, np.float32)
    fig = overlay_figure(thumb, empty, CELL0, (0, 0), SLIDE, no_tissue_text="slide smaller than one cell")
    texts = [t.get_text() for t in fig.texts]
    assert "slide smaller than one cell" in texts and NO_TISSUE_TEXT not in texts
    empty_text = overlay_figure(thumb, empty, CELL0, (0, 0), SLIDE, no_tissue_text="")  # was a ZeroDivisionError
    assert NO_TISSUE_TEXT in [t.get_text() for t in empty_text.texts]
    with pytest.raises(UsageError, match="warning must be one line"):
        overlay_figure(thumb, empty, CELL0, (0, 0), SLIDE, warning="two\nlines")


def test_the_no_tissue_text_stays_legible_on_a_sliver_of_a_slide():
    """A 64 x 4,000 px slide's 33 px wide panel drew "no tissue found" about 3 px high; a 4,000 x 64 px one's
    box was taller than its panel and covered the legend band's line."""
    from wsi_vssm.outputs.overlay import MIN_FONT_PX, NO_CELL_NOTE

    empty = np.full((4, 4), np.nan, np.float32)
    tall = overlay_figure(np.full((2048, 33, 3), 240, np.uint8), empty, 16.0, (0, 0), (33, 2048), title="s")
    tall.canvas.draw()
    note = next(t for t in tall.texts if t.get_text() == NO_TISSUE_TEXT)
    assert note.get_fontsize() * 100 / 72 >= MIN_FONT_PX - 1e-6  # at least the legend's size
    box = note.get_bbox_patch().get_window_extent(tall.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= tall.bbox.width, box
    low = overlay_figure(np.full((12, 600, 3), 240, np.uint8), empty, 16.0, (0, 0), (600, 12), title="s")
    texts = [t.get_text() for t in low.texts]
    assert NO_TISSUE_TEXT not in texts and f"{NO_TISSUE_TEXT}: {NO_CELL_NOTE}" in texts  # the band's line only


def test_drawing_a_large_overlay_stays_small_and_pixel_exact(tmp_path):
    """matplotlib made float copies of the whole thumbnail as it drew it: 570 MB of Python-visible arrays for a
    2,100 x 2,542 overlay, the peak of a small slide's run. Drawn in strips, the same pixels cost a tenth."""
    import tracemalloc

    h, w = 2542, 2100
    thumb = np.random.default_rng(0).integers(120, 255, (h, w, 3), dtype=np.uint8)
    prob = np.full((h // 8, w // 8), 0.1, np.float32)  # nothing tinted: the panel is the thumbnail
    tracemalloc.start()
    try:
        overlay_png(tmp_path / "o.png", thumb, prob, 8.0, (0, 0), (w, h), cell_threshold=0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20, f"{peak / 2**20:.0f} MB"
    img = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"))
    top = int(Image.open(tmp_path / "o.png").text["wsi_vssm.panel"].split()[1])
    assert np.array_equal(img[top:top + h, :w], thumb)  # every strip in its place, bit for bit
