"""Slides as other tools write them: palette, min-is-white and CMYK TIFFs, ImageJ calibration, tifffile's own
resolution units, SubIFD pyramids without OME metadata, and the OME-Zarr paths users give by mistake.

Tiny files are written in tmp_path with tifffile, PIL and zarr, as those tools write them (a review's probe).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from wsi_vssm.io import UnsupportedFormat, open_slide

RGB = np.random.default_rng(0).integers(0, 256, (64, 96, 3)).astype(np.uint8)
MPP = 0.972


def read_all(path, backend="auto") -> np.ndarray:
    with open_slide(path, backend=backend) as slide:
        return slide.read_region((0, 0), 0, slide.dimensions)


@pytest.mark.parametrize("tiled", [False, True], ids=["strips", "tiles"])
def test_a_palette_tiff_reads_through_its_colour_map(tmp_path, tiled):
    """A colour-indexed TIFF (ImageJ "8-bit Color", GIMP indexed, PIL mode P) read as its indices in gray: an H&E
    slide was called unstained."""
    indexed = Image.fromarray(RGB).quantize(64)
    idx = np.asarray(indexed)
    pal = np.asarray(indexed.getpalette()[:192], np.uint16).reshape(-1, 3)
    truth = pal[idx].astype(np.uint8)
    path = tmp_path / "palette.tif"
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, :64] = pal.T * 257  # 16 bits a channel, as the TIFF spec has it
    tifffile.imwrite(path, idx, photometric="palette", colormap=cmap, metadata=None,
                     **({"tile": (32, 32)} if tiled else {}))
    np.testing.assert_array_equal(read_all(path, "tifffile"), truth)
    np.testing.assert_array_equal(read_all(path), truth)


def test_min_is_white_gray_and_cmyk_read_as_their_colours(tmp_path):
    gray = RGB[..., 0]
    tifffile.imwrite(tmp_path / "white.tif", 255 - gray, photometric="miniswhite", metadata=None)
    np.testing.assert_array_equal(read_all(tmp_path / "white.tif"), np.repeat(gray[..., None], 3, 2))
    Image.fromarray(RGB).convert("CMYK").save(tmp_path / "cmyk.tif")  # PIL: C = 255 - R, K = 0
    np.testing.assert_array_equal(read_all(tmp_path / "cmyk.tif"), RGB)


def test_a_photometric_it_does_not_convert_is_refused_by_name(tmp_path):
    path = tmp_path / "lab.tif"
    tifffile.imwrite(path, RGB, photometric="cielab", metadata=None)
    with pytest.raises(UnsupportedFormat, match=r"lab\.tif: TIFF photometric interpretation CIELAB is not read: "
                                                r"convert it to RGB"):
        open_slide(path, backend="tifffile")


@pytest.mark.parametrize("unit", ["micron", "\\u00B5m"])
def test_imagej_calibration_gives_the_resolution(tmp_path, unit):
    """ImageJ, Fiji and QuPath's ImageJ TIFF write ResolutionUnit none and the unit in their description: the
    slide said it states no resolution."""
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, RGB, imagej=True, resolution=(1 / MPP, 1 / MPP), metadata={"unit": unit})
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(MPP) and slide.mpp_source == "imagej-metadata"


def test_an_uncalibrated_imagej_tiff_states_no_resolution(tmp_path):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, RGB, imagej=True, resolution=(1.0, 1.0), metadata={"unit": "pixel"})
    with open_slide(path) as slide:
        assert slide.mpp is None


@pytest.mark.parametrize("unit, per_px", [("MICROMETER", 1 / MPP), ("MILLIMETER", 1000 / MPP)])
def test_tifffiles_own_resolution_units_are_read(tmp_path, unit, per_px):
    path = tmp_path / "u.tif"
    tifffile.imwrite(path, RGB, resolution=(per_px, per_px), resolutionunit=unit, metadata=None)
    with open_slide(path, backend="tifffile") as slide:
        assert slide.mpp == pytest.approx(MPP) and slide.mpp_source == "tiff-resolution"


def test_ome_picometres_are_a_length(tmp_path):
    path = tmp_path / "pm.ome.tif"
    tifffile.imwrite(path, RGB, photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": MPP * 1e6, "PhysicalSizeXUnit": "pm",
                               "PhysicalSizeY": MPP * 1e6, "PhysicalSizeYUnit": "pm"})
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(MPP)


def test_auto_takes_the_pyramid_openslide_does_not_see(tmp_path):
    """Reduced levels stored as SubIFDs of a TIFF without OME metadata (libvips --subifd, tifffile's default):
    OpenSlide reads one level, and every region and thumbnail came from the full-size pixels."""
    pytest.importorskip("openslide")
    levels = [np.ascontiguousarray(np.tile(RGB, (4, 4, 1))[:: 2**i, :: 2**i]) for i in range(3)]
    path = tmp_path / "subifd.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], subifds=2, tile=(64, 64), photometric="rgb", metadata=None,
                 resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
        for level in levels[1:]:
            tw.write(level, subfiletype=1, tile=(64, 64), photometric="rgb", metadata=None)
    with open_slide(path, backend="openslide") as slide:
        assert slide.level_count == 1  # what auto used to take
    with open_slide(path) as slide:
        assert slide.backend == "tifffile" and slide.level_count == 3 and slide.mpp == pytest.approx(MPP)
        np.testing.assert_array_equal(slide.read_region((0, 0), 2, slide.level_dimensions[2]), levels[2])


def test_a_plain_one_level_tiff_stays_with_openslide(tmp_path):
    pytest.importorskip("openslide")
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, RGB, tile=(32, 32), photometric="rgb", metadata=None)
    with open_slide(path) as slide:
        assert slide.backend == "openslide" and slide.level_count == 1


def _ome_zarr(path, fmt: int = 2):
    group = zarr.open_group(path, mode="w", zarr_format=fmt)
    group.create_array("0", data=np.moveaxis(RGB, 2, 0), chunks=(3, 32, 32))
    ms = [{"version": "0.4", "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space",
                                                                          "unit": "micrometer"},
                                      {"name": "x", "type": "space", "unit": "micrometer"}],
           "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, MPP, MPP]}]}]}]
    group.attrs["multiscales"] = ms
    return path


@pytest.mark.parametrize("fmt", [2, 3])
def test_a_pyramid_level_given_for_the_image_names_the_folder_to_give(tmp_path, fmt):
    store = tmp_path / "raw.zarr"
    root = zarr.open_group(store, mode="w", zarr_format=fmt)
    root.attrs["bioformats2raw.layout"] = 3
    _ome_zarr(store / "0", fmt)
    assert read_all(store).shape == RGB.shape
    with pytest.raises(UnsupportedFormat, match=r"raw\.zarr/0/0: one array of a zarr store \(a pyramid level\?\), "
                                                r"not an image: give the image's folder, .*raw\.zarr$"):
        open_slide(store / "0" / "0")


def test_an_image_in_a_sub_group_without_the_layout_mark_is_pointed_to(tmp_path):
    store = tmp_path / "nested.zarr"
    zarr.open_group(store, mode="w", zarr_format=2)
    _ome_zarr(store / "0")
    with pytest.raises(UnsupportedFormat, match=r"without OME-NGFF 'multiscales' metadata; its sub-group '0' holds "
                                                r"an image: give .*nested\.zarr/0"):
        open_slide(store)
    assert read_all(store / "0").shape == RGB.shape


def test_a_zipped_store_says_unpack_it(tmp_path):
    import shutil

    _ome_zarr(tmp_path / "img.zarr")
    archive = shutil.make_archive(str(tmp_path / "img.ome.zarr"), "zip", tmp_path / "img.zarr")
    with pytest.raises(UnsupportedFormat, match=r"img\.ome\.zarr\.zip: a ZIP archive: unpack it first"):
        open_slide(archive)
    assert json.loads((tmp_path / "img.zarr" / ".zattrs").read_text())["multiscales"]


@pytest.mark.parametrize("backend", ["tifffile", "openslide", "auto"])
def test_pixels_that_are_not_square_are_warned_about(tmp_path, backend):
    """x and y resolutions twofold apart were read as square pixels without a word (the image squashed in y).
    `auto` tries both backends on a one-level TIFF, and says it once."""
    if backend != "tifffile":
        pytest.importorskip("openslide")
    path = tmp_path / "aniso.tif"
    tifffile.imwrite(path, RGB, tile=(32, 32), photometric="rgb", metadata=None,
                     resolution=(1e4 / MPP, 1e4 / (2 * MPP)), resolutionunit="CENTIMETER")
    with pytest.warns(UserWarning, match=r"aniso\.tif: pixels are not square \(0\.972 x 1\.944 um\): read as 0\.972 "
                                         r"um square") as said:
        slide = open_slide(path, backend=backend)
    assert len([w for w in said if "not square" in str(w.message)]) == 1
    with slide:
        assert slide.mpp == pytest.approx(MPP) and slide.properties["wsi_vssm.non-square-pixels"] == "0.972 x 1.944"


def test_ome_pixel_sizes_that_are_not_square_are_warned_about(tmp_path):
    """OME-TIFF PhysicalSizeY and an OME-Zarr y scale were not compared with x."""
    tiff = tmp_path / "aniso.ome.tif"
    tifffile.imwrite(tiff, RGB, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": MPP,
                                                             "PhysicalSizeY": 2 * MPP})
    store = _ome_zarr(tmp_path / "aniso.zarr")
    ms = zarr.open_group(store, mode="r+").attrs["multiscales"]
    ms[0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [1, 2 * MPP, MPP]
    zarr.open_group(store, mode="r+").attrs["multiscales"] = ms
    for path in (tiff, store):
        with pytest.warns(UserWarning, match=r"pixels are not square \(0\.972 x 1\.944 um\)"):
            slide = open_slide(path)
        with slide:
            assert slide.mpp == pytest.approx(MPP)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # square ones say nothing
        open_slide(_ome_zarr(tmp_path / "square.zarr")).close()


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_raw_strips_read_through_a_memory_map_and_one_compressed_strip_decodes_once(tmp_path, monkeypatch, byteorder):
    """ImageJ writes an image as raw strips, PIL and others a small image as one compressed strip: every read
    decoded each strip it touched (the whole image for one strip: 0.8 s for any 512 px read of a 12,000 px
    deflate strip). Raw samples are memory-mapped now, and one compressed strip is decoded once."""
    big = np.random.default_rng(1).integers(0, 65536, (80, 120, 3)).astype(np.uint16)
    raw, deflate = tmp_path / "raw.tif", tmp_path / "deflate.tif"
    tifffile.imwrite(raw, big, byteorder=byteorder, rowsperstrip=16, metadata=None)
    tifffile.imwrite(deflate, RGB, compression="zlib", rowsperstrip=RGB.shape[0], metadata=None)
    tifffile.imwrite(tmp_path / "tiled.tif", big, byteorder=byteorder, tile=(16, 16), metadata=None)
    through_zarr = read_all(tmp_path / "tiled.tif", "tifffile")
    decodes = []
    real = tifffile.TiffPage.decode  # a cached property giving the page's decode function

    def counted(page):
        def decode(*args, **kwargs):
            decodes.append(page.index)
            return real.func(page)(*args, **kwargs)
        return decode

    monkeypatch.setattr(tifffile.TiffPage, "decode", property(counted))
    with open_slide(raw, backend="tifffile") as slide:
        region = slide.read_region((7, 9), 0, (50, 40))
        whole = slide.read_region((0, 0), 0, slide.dimensions)
    assert decodes == [] and region.flags.writeable and region.dtype == np.uint8
    np.testing.assert_array_equal(region, whole[9:49, 7:57])
    np.testing.assert_array_equal(whole, through_zarr)
    with open_slide(deflate, backend="tifffile") as slide:
        reads = [slide.read_region((x, 3), 0, (20, 30)) for x in (0, 40, 70)]
    assert len(decodes) == 1
    for x, got in zip((0, 40, 70), reads, strict=True):
        np.testing.assert_array_equal(got, RGB[3:33, x:x + 20])
