"""Tissue detection: real tiles (skipped without ../shared/data) and small synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, shared_file
from PIL import Image

from wsi_vssm.errors import UsageError
from wsi_vssm.io import ArraySlide
from wsi_vssm.io.tissue import TissueParams, slide_tissue_mask, tissue_fraction, tissue_mask


def _tile(name: str) -> np.ndarray:
    return np.asarray(Image.open(shared_file("tiles", name)).convert("RGB"))


def _tiles(pattern: str) -> list[str]:
    found = sorted(p.name for p in (SHARED_DATA / "tiles").glob(pattern))
    return found or [f"absent-{pattern}"]  # one id that skips cleanly when the data is not there


@pytest.mark.parametrize("name", _tiles("no-tissue*.png"))
def test_no_tissue_tiles_give_almost_nothing(name):
    assert tissue_mask(_tile(name)).mean() < 0.05


@pytest.mark.parametrize("name", _tiles("almost-white*.png"))
def test_almost_white_tiles_give_little(name):
    assert tissue_mask(_tile(name)).mean() < 0.05


@pytest.mark.parametrize("name", _tiles("tissue-*.png"))
def test_tissue_tiles_give_substantial_tissue(name):
    assert tissue_mask(_tile(name)).mean() > 0.5


# Share of unmistakable ink pixels allowed in the mask. Where red ink lies over dense tissue, pixels mixing
# the two stay ambiguous (they keep the tissue's texture), so that tile gets a looser bound.
_INK_TOLERANCE = {"high-nuclei-score-red-pen-level1.png": 0.15}


@pytest.mark.parametrize("name", _tiles("*pen*.png"))
def test_pen_pixels_are_excluded(name):
    rgb = _tile(name).astype(np.int16)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # Unmistakable ink: green over red (green, cyan and blue ink; stain always has more red than green), or
    # a strong red with no more blue than green (eosin is red plus blue).
    green_blue = (g > r + 25) & (np.maximum(g, b) - r > 50)
    strong_red = (r - np.maximum(g, b) > 80) & (b <= g + 10)
    ink = green_blue | strong_red
    assert ink.sum() > 200, "the tile should contain visible ink"
    mask = tissue_mask(rgb.astype(np.uint8))
    assert (mask & ink).sum() <= _INK_TOLERANCE.get(name, 0.01) * ink.sum()
    assert not (mask & green_blue).any()


def test_pen_tiles_with_tissue_keep_the_tissue():
    for name in ("medium-nuclei-score-green-pen-level1.png", "high-nuclei-score-red-pen-level1.png"):
        assert 0.25 < tissue_mask(_tile(name)).mean() < 0.97


@pytest.mark.parametrize("name", _tiles("kidney-ihc*.png"))
def test_ihc_kidney_tiles_are_tissue(name):
    # Pale blue haematoxylin and brown DAB are stain, not blue pen; the tiles are largely tissue.
    frac = tissue_mask(_tile(name)).mean()
    assert frac > 0.2, frac


def test_blurred_tissue_is_dropped_and_sharp_tissue_kept():
    from scipy import ndimage as ndi

    rgb = _tile("tissue-level0-7352-11762-7864-12274.png")
    blurred = np.stack([ndi.gaussian_filter(rgb[..., c].astype(float), 6) for c in range(3)], axis=2)
    assert tissue_mask(rgb).mean() > 0.5
    assert tissue_mask(blurred.round().astype(np.uint8)).mean() < 0.1
    assert tissue_mask(blurred.round().astype(np.uint8), min_texture=0).mean() > 0.5


# ---- synthetic: no shared data needed ------------------------------------------------------------------
def _synthetic(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A white 200x300 image with a textured pink-purple disc (tissue), a green stroke and a white speck."""
    img = np.full((200, 300, 3), 242, np.uint8)
    yy, xx = np.mgrid[:200, :300]
    disc = (yy - 100) ** 2 + (xx - 110) ** 2 < 70**2
    stain = np.array([200, 120, 180]) + rng.normal(0, 18, (200, 300, 1))
    img[disc] = np.clip(stain[disc], 0, 255).astype(np.uint8)
    img[20:180, 230:245] = (40, 170, 90)  # green pen
    img[100:102, 110:112] = 250  # a 4-px hole inside the disc: filled
    img[10:12, 10:12] = (190, 100, 170)  # a 4-px speck on glass: removed
    return img, disc


def test_synthetic_disc_pen_speck_and_hole():
    img, disc = _synthetic(np.random.default_rng(0))
    mask = tissue_mask(img)
    assert mask.dtype == bool and mask.shape == img.shape[:2]
    assert (mask & disc).sum() > 0.95 * disc.sum()
    assert not mask[:, 225:250].any()  # pen stroke and its rim
    assert not mask[5:15, 5:15].any()  # speck
    assert mask[100:102, 110:112].all()  # hole filled


def test_rgba_transparent_is_background_and_grey_is_background():
    img, _ = _synthetic(np.random.default_rng(1))
    rgba = np.dstack([img, np.zeros(img.shape[:2], np.uint8)])
    assert not tissue_mask(rgba).any()
    grey = np.full((64, 64, 3), 150, np.uint8)
    assert not tissue_mask(grey).any()
    black = np.full((64, 64, 3), 10, np.uint8)
    assert not tissue_mask(black).any()


def test_params_are_validated():
    img, _ = _synthetic(np.random.default_rng(2))
    with pytest.raises(UsageError, match="unknown tissue parameter"):
        tissue_mask(img, min_chroma_typo=0.1)
    with pytest.raises(UsageError, match="non-negative"):
        TissueParams(min_chroma=-1)
    with pytest.raises(UsageError, match="H x W x 3"):
        tissue_mask(np.zeros((5, 5), np.uint8))
    loose = tissue_mask(img, params=TissueParams(min_object=0))
    assert loose[10:12, 10:12].all()  # the speck survives when speck removal is off


def test_tissue_fraction_boxes():
    m = np.zeros((10, 10), bool)
    m[:, :5] = True
    assert tissue_fraction(m) == pytest.approx(0.5)
    assert tissue_fraction(m, (0, 0, 5, 10)) == pytest.approx(1.0)
    assert tissue_fraction(m, (4.5, 0, 1, 10)) == pytest.approx(0.5)  # half a tissue pixel, half not
    assert tissue_fraction(m, (3.5, 0, 1, 10)) == pytest.approx(1.0)  # halves of two tissue pixels
    assert tissue_fraction(m, (4, 0, 1.5, 10)) == pytest.approx(1 / 1.5)  # a whole tissue pixel, half a glass one
    assert tissue_fraction(m, (0, 0, 5, 20)) == pytest.approx(0.5)  # beyond the edge counts as background
    assert tissue_fraction(m, (20, 20, 5, 5)) == 0.0


def test_slide_tissue_mask_scale():
    img, disc = _synthetic(np.random.default_rng(3))
    big = np.kron(img, np.ones((4, 4, 1), np.uint8))  # 800 x 1200
    mask, scale = slide_tissue_mask(ArraySlide(big, mpp=4.0), max_side=300)
    assert mask.shape == (200, 300) and scale == pytest.approx(4.0)
    assert (mask & disc).sum() > 0.9 * disc.sum()


def test_slide_tissue_mask_is_never_finer_than_thumbnail_scale():
    # 1200 px at 0.5 um/px = 600 um: pixels of at least 4 um give a mask of 150 px, whatever max_side allows.
    img, _ = _synthetic(np.random.default_rng(3))
    big = np.kron(img, np.ones((4, 4, 1), np.uint8))
    mask, scale = slide_tissue_mask(ArraySlide(big, mpp=0.5), max_side=1000)
    assert mask.shape == (100, 150) and scale == pytest.approx(8.0)


def test_sample_slide_tissue_is_stable_across_thumbnail_sizes():
    from wsi_vssm.io import open_slide

    path = Path(__file__).resolve().parents[2] / "sample_data" / "cmu-1-small-region.svs"
    with open_slide(path) as slide:
        mask, _ = slide_tissue_mask(slide, max_side=2048)
        coarse = tissue_mask(slide.thumbnail(512))
    # about a third of the crop is tissue; a too-fine thumbnail used to lose most of it (0.05)
    assert 0.25 < mask.mean() < 0.45 and abs(mask.mean() - coarse.mean()) < 0.08
