"""Bad input gives the right SlideError subclass with a one-line message naming the file."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import tifffile
import zarr
from conftest import shared_file

from wsi_vssm.io import (
    CorruptSlide,
    MissingBackend,
    SlideReadError,
    UnsupportedFormat,
    open_slide,
)

FILE_BACKENDS = ["auto", "openslide", "tifffile"]


def _one_line_naming(err: pytest.ExceptionInfo, path) -> str:
    text = str(err.value)
    assert "\n" not in text
    assert str(path) in text
    return text


def _tiny_tiff(path):
    img = np.full((64, 64, 3), 200, np.uint8)
    tifffile.imwrite(path, img, tile=(32, 32), photometric="rgb", metadata=None)
    return path


@pytest.mark.parametrize("backend", [*FILE_BACKENDS, "zarr"])
def test_missing_file(tmp_path, backend):
    path = tmp_path / "nope.svs"
    with pytest.raises(UnsupportedFormat) as err:
        open_slide(path, backend=backend)
    assert "no such file" in _one_line_naming(err, path)


@pytest.mark.parametrize("backend", [*FILE_BACKENDS, "zarr"])
def test_directory_that_is_no_slide(tmp_path, backend):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedFormat) as err:
        open_slide(tmp_path, backend=backend)
    _one_line_naming(err, tmp_path)


@pytest.mark.parametrize("backend", FILE_BACKENDS)
@pytest.mark.parametrize("content", [b"just some text\n", b""], ids=["text", "empty"])
def test_text_or_empty_file_named_svs(tmp_path, backend, content):
    path = tmp_path / "slide.svs"
    path.write_bytes(content)
    with pytest.raises(UnsupportedFormat) as err:
        open_slide(path, backend=backend)
    _one_line_naming(err, path)


def test_a_tiff_is_no_zarr_store(tmp_path):
    path = _tiny_tiff(tmp_path / "a.tif")
    with pytest.raises(UnsupportedFormat, match="OME-Zarr"):
        open_slide(path, backend="zarr")


def test_zarr_store_without_multiscales(tmp_path):
    group = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3)
    group.create_array("0", shape=(8, 8), dtype="uint8")
    with pytest.raises(UnsupportedFormat, match="multiscales") as err:
        open_slide(tmp_path / "plain.zarr")
    _one_line_naming(err, tmp_path / "plain.zarr")


def test_an_image_with_an_empty_axis_is_corrupt(tmp_path):
    """An OME-Zarr of shape (3, 0, 64) once gave a ZeroDivisionError (a traceback from `info`)."""
    group = zarr.open_group(str(tmp_path / "zeros.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(3, 0, 64), chunks=(3, 32, 32), dtype="uint8")
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.5, 0.5]}]}]}]
    with pytest.raises(CorruptSlide, match=r"level 0 is 64 x 0 px: an empty image") as err:
        open_slide(tmp_path / "zeros.ome.zarr")
    _one_line_naming(err, tmp_path / "zeros.ome.zarr")


def test_zarr_store_with_broken_metadata(tmp_path):
    store = tmp_path / "broken.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{ not json")
    with pytest.raises(CorruptSlide) as err:
        open_slide(store)
    _one_line_naming(err, store)


def test_truncated_tiff_is_corrupt(tmp_path):
    rng = np.random.default_rng(0)
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, rng.integers(0, 255, (512, 512, 3), np.uint8), tile=(64, 64), compression="zlib")
    path = tmp_path / "cut.tif"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    # Depending on where the cut falls the structure or the pixel data is gone: CorruptSlide either way.
    with pytest.raises(CorruptSlide) as err:
        open_slide(path, backend="tifffile").read_region((0, 0), 0, (512, 512))
    _one_line_naming(err, path)


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_broken_svs_is_not_a_slide(backend):
    # broken.svs holds base64 text, no TIFF header at all: nothing recognises it, so UnsupportedFormat.
    path = shared_file("slides", "broken.svs")
    with pytest.raises(UnsupportedFormat) as err:
        open_slide(path, backend=backend)
    _one_line_naming(err, path)


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_unopenable_tiff_is_corrupt(backend):
    # A real TIFF whose compression code (52479) is no compression at all.
    path = shared_file("slides", "unopenable.tiff")
    with pytest.raises(CorruptSlide) as err:
        open_slide(path, backend=backend)
    assert "52479" in _one_line_naming(err, path)


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_unreadable_svs_opens_then_fails_on_read_naming_the_region(backend):
    path = shared_file("slides", "unreadable.svs")
    reader = open_slide(path, backend=backend)
    assert reader.dimensions == (16, 16)
    with pytest.raises(SlideReadError) as err:
        reader.read_region((0, 0), 0, (16, 16))
    text = _one_line_naming(err, path)
    assert "region at (0, 0) size 16x16 (level 0)" in text
    assert err.value.__cause__ is not None  # the backend's own error is chained


def test_dicom_is_not_for_tifffile():
    path = shared_file("slides", "boxes_0.dcm")
    with pytest.raises(UnsupportedFormat, match="not a TIFF") as err:
        open_slide(path, backend="tifffile")
    _one_line_naming(err, path)


# ---- missing libraries -----------------------------------------------------------------------------------


def test_missing_openslide_names_the_pip_command(tmp_path, monkeypatch):
    path = _tiny_tiff(tmp_path / "a.tif")
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(MissingBackend, match="pip install openslide-python openslide-bin") as err:
        open_slide(path, backend="openslide")
    _one_line_naming(err, path)


def test_dicom_without_openslide_is_a_missing_backend(monkeypatch):
    path = shared_file("slides", "boxes_0.dcm")
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(MissingBackend, match="pip install openslide-python"):
        open_slide(path)


@pytest.mark.parametrize(
    "module, backend", [("tifffile", "tifffile"), ("zarr", "tifffile"), ("zarr", "zarr")]
)
def test_missing_tifffile_or_zarr_names_the_pip_command(tmp_path, monkeypatch, module, backend):
    path = _tiny_tiff(tmp_path / "a.tif") if backend == "tifffile" else tmp_path
    if backend == "zarr":
        (tmp_path / "zarr.json").write_text("{}")
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingBackend, match=f"pip install {module}") as err:
        open_slide(path, backend=backend)
    _one_line_naming(err, path)
