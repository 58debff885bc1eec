"""Thumbnails of slides without a small level (single-level TIFFs) are streamed in blocks, in bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import tifffile

from wsi_vssm.io import open_slide
from wsi_vssm.io.base import SlideReader, resize
from wsi_vssm.io.tissue import slide_tissue
from wsi_vssm.synth.writer import write_repeated_tile_tiff


def _single_level_tiff(path, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A single-level zlib-tiled RGB TIFF (no pyramid) with a dark disc of "tissue"; returns its pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    disc = (xx - width * 0.4) ** 2 + (yy - height * 0.5) ** 2 < (min(width, height) * 0.3) ** 2
    img = np.full((height, width, 3), 240, np.uint8)
    img[disc] = (np.array([200, 90, 160]) + rng.integers(-20, 20, (int(disc.sum()), 3))).astype(np.uint8)
    tifffile.imwrite(path, img, tile=(256, 256), compression="zlib", photometric="rgb")
    return img


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])  # summed tile by tile; read in blocks
def test_streamed_thumbnail_equals_the_one_read_at_once(tmp_path, backend):
    pytest.importorskip(backend)
    path = tmp_path / "flat.tif"
    img = _single_level_tiff(path, 3000, 2000)
    with open_slide(path, backend=backend, mpp=1.0) as slide:
        assert slide.level_count == 1
        whole = slide.thumbnail(512)
        slide.thumbnail_read_limit = 100_000  # force streaming
        slide.THUMBNAIL_BLOCK = 700  # several blocks per side, with seams at non-integer positions
        streamed = slide.thumbnail(512)
    assert streamed.shape == whole.shape == (341, 512, 3)
    diff = np.abs(streamed.astype(int) - whole.astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8  # block seams change a few boundary pixels
    if backend == "tifffile":
        assert diff.max() <= 1  # tile sums: PIL's own box rule, rounded once instead of twice
    np.testing.assert_allclose(streamed.mean(axis=(0, 1)), resize(img, 512, 341).mean(axis=(0, 1)), atol=1.0)


class _TiledArray(SlideReader):
    """An in-memory level handed out in 96 px tiles, the one at (96, 192) missing (background)."""

    def __init__(self, img):
        super().__init__(None, [(img.shape[1], img.shape[0])])
        self.img = img

    def _read_level(self, level, x, y, w, h):
        return self.img[y : y + h, x : x + w]

    def _map_tiles(self, level, func):
        def tiles():
            for y in range(0, self.img.shape[0], 96):
                for x in range(0, self.img.shape[1], 96):
                    tile = np.zeros((96, 96, 3), np.uint8)  # edge tiles padded, as a TIFF stores them
                    part = self.img[y : y + 96, x : x + 96]
                    tile[: part.shape[0], : part.shape[1]] = part
                    yield func(y, x, None if (y, x) == (96, 192) else tile)

        return (96, 96), tiles()


@pytest.mark.parametrize("size", [(700, 500), (1000, 333)])
def test_tile_sums_are_the_box_resize_of_the_whole_level(size):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (size[1], size[0], 3), np.uint8)
    slide = _TiledArray(img)
    slide.thumbnail_read_limit = 0
    thumb = slide.thumbnail(128)
    img[96:192, 192:288] = 255  # the missing tile reads as background
    expected = resize(img, *thumb.shape[1::-1])
    assert np.abs(thumb.astype(int) - expected.astype(int)).max() <= 1


def _tiled_flat_tiff(path, side: int) -> None:
    """A side x side single-level TIFF written from one pre-compressed tile repeated (seconds, a few MB)."""
    rng = np.random.default_rng(0)
    tile = np.full((256, 256, 3), 235, np.uint8)  # a stripe of glass, then textured pink "tissue"
    tile[:, 64:] = (np.array([190, 80, 150]) + rng.integers(-40, 40, (256, 192, 3))).clip(0, 255)
    write_repeated_tile_tiff(path, side, tile)


@pytest.mark.slow
def test_large_single_level_slide_thumbnail_and_mask_in_bounded_memory(tmp_path):
    """16,384 px a side: read at once it would need 805 MB; streamed, the peak stays a small fraction of that."""
    path = tmp_path / "big.tif"
    _tiled_flat_tiff(path, 16_384)
    with open_slide(path, backend="tifffile", mpp=4.0) as slide:
        tracemalloc.start()
        slide.thumbnail(2048)
        _, thumb_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        tissue = slide_tissue(slide)  # the thumbnail plus the mask's float planes at 2,048 px
        _, mask_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert thumb_peak < 150e6, f"thumbnail peak {thumb_peak / 1e6:.0f} MB"
    assert mask_peak < 350e6, f"tissue mask peak {mask_peak / 1e6:.0f} MB"
    assert 0.5 < tissue.fraction < 0.95  # three quarters of every tile is stained


def test_auto_reads_a_huge_flat_tiff_with_tifffile(tmp_path):
    """OpenSlide reads a pyramid-less generic TIFF too, but its thumbnail block by block about 4x slower."""
    pytest.importorskip("openslide")
    tile = np.full((256, 256, 3), 235, np.uint8)
    tile[64:192, 64:192] = (190, 80, 150)
    write_repeated_tile_tiff(tmp_path / "huge.tif", 8448, tile)  # 71 MP: above the one-read limit (64 MP)
    write_repeated_tile_tiff(tmp_path / "small.tif", 2048, tile)
    with open_slide(tmp_path / "huge.tif") as huge, open_slide(tmp_path / "small.tif") as small:
        assert (huge.backend, small.backend) == ("tifffile", "openslide")
