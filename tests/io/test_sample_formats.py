"""Sample formats beyond uint8: which value reads as white (float 0-1 or 0-255, signed, 16-bit), NaN, refusals.

Tiny tiled TIFFs (and one OME-Zarr) are written in tmp_path; the rule is `formats.sample_top`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile
import zarr

from wsi_vssm.io import UnsupportedFormat, open_slide

RGB = np.random.default_rng(0).integers(0, 256, (64, 96, 3)).astype(np.uint8)


def write_tiff(path, levels, **kw):
    """Tiled RGB, each level of the pyramid a page of its own."""
    with tifffile.TiffWriter(path) as tw:
        for i, img in enumerate(levels):
            tw.write(img, tile=(32, 32), photometric="rgb", subfiletype=1 if i else 0, metadata=None, **kw)
    return path


def read_all(path, backend="tifffile") -> np.ndarray:
    with open_slide(path, backend=backend) as slide:
        return slide.read_region((0, 0), 0, slide.dimensions)


@pytest.mark.parametrize("data", [
    RGB.astype(np.float32),  # 0-255 in floats read as white: "no tissue found"
    RGB / 255.0,
    RGB.astype(np.int16),  # 0-255 in a signed type read nearly black (scaled by 32,767)
    RGB.astype(np.int32),
    RGB.astype(np.uint16) * 257,  # unsigned: over the type's whole range, as before
], ids=["float-0-255", "float-0-1", "int16-0-255", "int32-0-255", "uint16"])
def test_samples_read_as_the_rgb_they_hold(tmp_path, data):
    path = write_tiff(tmp_path / "s.tif", [data, np.ascontiguousarray(data[::2, ::2])])
    np.testing.assert_array_equal(read_all(path), RGB)


def test_auto_reads_float_and_signed_tiffs_with_tifffile(tmp_path):
    """OpenSlide, tried first, opened these: it failed on every float read and showed int16 wrapped ("IHC")."""
    pytest.importorskip("openslide")
    for i, data in enumerate([RGB.astype(np.float32), RGB.astype(np.int16)]):
        path = write_tiff(tmp_path / f"{i}.tif", [data])
        with open_slide(path) as slide:
            assert slide.backend == "tifffile"
            np.testing.assert_array_equal(slide.read_region((0, 0), 0, slide.dimensions), RGB)


def test_int8_scales_by_its_positive_range(tmp_path):
    """int8 did not read at all: missing tiles were filled with 255, out of int8's range."""
    half = (RGB // 2).astype(np.int8)
    half[0, 0] = -1  # resampling overshoot: clipped to 0
    expected = np.round(half.clip(0) * (255 / 127)).astype(np.uint8)
    np.testing.assert_array_equal(read_all(write_tiff(tmp_path / "s.tif", [half])), expected)


@pytest.mark.parametrize("data", [RGB.astype(np.int16) - 128, RGB / 127.5 - 1.0], ids=["int16", "float"])
def test_signed_data_is_refused_in_one_line(tmp_path, data):
    path = write_tiff(tmp_path / "signed.tif", [data])
    with pytest.raises(UnsupportedFormat) as err:
        open_slide(path, backend="tifffile")
    assert str(err.value).startswith(f"{path}: ") and "signed data" in str(err.value) and "\n" not in str(err.value)


def test_floats_beyond_any_range_are_refused(tmp_path):
    path = write_tiff(tmp_path / "hdr.tif", [RGB.astype(np.float32) * 1000])
    with pytest.raises(UnsupportedFormat, match=r"hdr\.tif: float32 samples from 0 to 255,000: not in 0-1"):
        open_slide(path, backend="tifffile")


def test_stated_sample_range_wins_over_the_pixels(tmp_path):
    """SMinSampleValue / SMaxSampleValue say 0-255: values up to 1 are then nearly black, not white."""
    dark = RGB / 255.0
    tags = [(340, "d", 1, 0.0, True), (341, "d", 1, 255.0, True)]
    out = read_all(write_tiff(tmp_path / "s.tif", [dark], extratags=tags))
    assert out.max() == 1 and out.mean() < 1


def test_nan_reads_white_and_inf_clips(tmp_path):
    data = (RGB / 255.0).astype(np.float32)
    data[0, :3] = [np.nan, np.inf, -np.inf]
    data[1, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an invalid cast warned and gave 0
        out = read_all(write_tiff(tmp_path / "s.tif", [data]))
    assert out[0, 0, :].tolist() == [255, 255, 0] and (out[1, 0] == 255).all()
    np.testing.assert_array_equal(out[2:], RGB[2:])


def test_missing_16_bit_tile_reads_white(tmp_path):
    """A sparse tile was filled with the raw value 255: 255 / 65,535 read black, tissue where nothing was scanned."""
    tile = np.full((32, 32, 3), 30000, np.uint16)
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, iter([tile, None, tile, tile]), shape=(64, 64, 3), dtype=np.uint16, tile=(32, 32),
                     photometric="rgb", metadata=None)
    out = read_all(path)
    assert (out[:32, 32:] == 255).all() and (out[:32, :32] == 117).all()


def test_ome_zarr_float_0_255_reads_as_is(tmp_path):
    group = zarr.open_group(str(tmp_path / "f.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(3, 64, 96), chunks=(3, 32, 32), dtype="float32")[:] = np.moveaxis(RGB, -1, 0)
    axes = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space", "unit": "micrometer"} for n in "yx"]
    scale = [{"type": "scale", "scale": [1, 0.5, 0.5]}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes,
                                   "datasets": [{"path": "0", "coordinateTransformations": scale}]}]
    np.testing.assert_array_equal(read_all(tmp_path / "f.zarr", backend="zarr"), RGB)


def _padded_corner(size=1100, pad=1024) -> np.ndarray:
    """A single-level float 0-255 scan whose top-left pad x pad corner is black fill (no data), tissue elsewhere."""
    data = np.full((size, size, 3), 200.0, np.float32)
    data[:pad, :pad] = 0.0
    return data


def test_the_range_is_looked_up_over_the_level_not_its_corner(tmp_path):
    """The range came from the top-left 1,024 px only: a blank corner said 0-0, so 0-1, and tissue read white."""
    path = tmp_path / "single.tif"
    tifffile.imwrite(path, _padded_corner(), tile=(256, 256), photometric="rgb", metadata=None)
    with open_slide(path, backend="tifffile") as slide:
        assert slide.read_region((1050, 1050), 0, (20, 20))[0, 0].tolist() == [200, 200, 200]


def test_ome_zarr_range_is_looked_up_over_the_level(tmp_path):
    group = zarr.open_group(str(tmp_path / "f.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(3, 1100, 1100), chunks=(3, 256, 256), dtype="float32")[:] = np.moveaxis(
        _padded_corner(), -1, 0)
    axes = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space", "unit": "micrometer"} for n in "yx"]
    scale = [{"type": "scale", "scale": [1, 0.5, 0.5]}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes,
                                   "datasets": [{"path": "0", "coordinateTransformations": scale}]}]
    with open_slide(tmp_path / "f.zarr", backend="zarr") as slide:
        assert slide.read_region((1050, 1050), 0, (20, 20))[0, 0].tolist() == [200, 200, 200]


@pytest.mark.parametrize("size", [(64, 96), (1024, 1024), (1025, 300), (5000, 80_000)])
def test_peek_windows_cover_the_level_within_the_budget(size):
    from wsi_vssm.io.formats import PEEK_PX, peek_windows

    w, h = size
    windows = peek_windows(w, h)
    assert all(x >= 0 and y >= 0 and x + ww <= w and y + hh <= h for x, y, ww, hh in windows)
    assert sum(ww * hh for _, _, ww, hh in windows) <= PEEK_PX * PEEK_PX
    if w <= PEEK_PX and h <= PEEK_PX:
        assert windows == [(0, 0, w, h)]
    else:  # the far corner is looked at as well as the near one
        assert (0, 0) in {(x, y) for x, y, _, _ in windows}
        assert any(x + ww == w and y + hh == h for x, y, ww, hh in windows)
