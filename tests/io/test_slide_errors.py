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


def _cyx_store(path, shape, chunks) -> None:
    """A one-level c, y, x OME-Zarr (NGFF 0.4) of uint8 with the given shape and chunks; no pixel written."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=shape, chunks=chunks, dtype="uint8")
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.5, 0.5]}]}]}]


def test_an_image_with_an_empty_axis_is_corrupt(tmp_path):
    """An OME-Zarr of shape (3, 0, 64) once gave a ZeroDivisionError (a traceback from `info`)."""
    _cyx_store(tmp_path / "zeros.ome.zarr", (3, 0, 64), (3, 32, 32))
    with pytest.raises(CorruptSlide, match=r"level 0 is 64 x 0 px: an empty image") as err:
        open_slide(tmp_path / "zeros.ome.zarr")
    _one_line_naming(err, tmp_path / "zeros.ome.zarr")


def test_a_zarr_chunk_too_large_to_decode_is_refused(tmp_path):
    """A 2.6 MB store whose one chunk decodes to 2.7 GB took 5.6 GB and minutes for `info` (a chunk bomb)."""
    _cyx_store(tmp_path / "bomb.ome.zarr", (3, 30000, 30000), (3, 30000, 30000))
    with pytest.raises(CorruptSlide, match=r"decode to 2,575 MiB each, more than this reader takes") as err:
        open_slide(tmp_path / "bomb.ome.zarr")
    _one_line_naming(err, tmp_path / "bomb.ome.zarr")


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


def test_the_first_bytes_are_shown_as_text_or_hex(tmp_path):
    """The message showed a Python bytes literal (b'IJrEr1vV')."""
    for content, shown in ((b"IJrEr1vV and more", "'IJrEr1vV'"), (b"\x00\xff\x1aAB", "00 ff 1a 41 42")):
        path = tmp_path / "slide.svs"
        path.write_bytes(content)
        with pytest.raises(UnsupportedFormat, match=f"file starts with {shown}") as err:
            open_slide(path, backend="auto")
        assert "b'" not in str(err.value)


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


# ---- paths that are no file, directories that lie, metadata beyond belief ----------------------------------


def _special_paths(tmp_path):
    import os

    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)
    loop_a, loop_b = tmp_path / "a.svs", tmp_path / "b.svs"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    broken = tmp_path / "gone.svs"
    broken.symlink_to(tmp_path / "nowhere.svs")
    return [(fifo, "not a regular file: a named pipe (FIFO)"), (loop_a, "a loop of symbolic links"),
            (broken, f"a broken symbolic link (to {tmp_path / 'nowhere.svs'})")]


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and symlinks")
@pytest.mark.parametrize("backend", [*FILE_BACKENDS, "zarr"])
def test_a_pipe_or_a_link_loop_is_refused_before_anything_reads_it(tmp_path, backend):
    """A FIFO named like a slide once hung the run (reading waits for a writer forever); a link loop was reported
    as 'no such file'."""
    for path, problem in _special_paths(tmp_path):
        with pytest.raises(UnsupportedFormat) as err:
            open_slide(path, backend=backend)
        assert _one_line_naming(err, path).endswith(problem)


def _claim_size(path, width: int, height: int) -> None:
    """Rewrite a classic little-endian TIFF's first directory to state another size (as LONG values)."""
    import struct

    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tf:
        tags = tf.pages[0].tags
        for name, value in (("ImageWidth", width), ("ImageLength", height)):
            tag = tags[name]
            struct.pack_into("<HHII", data, tag.valueoffset - 8, tag.code, 4, 1, value)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("layout", ["tiles", "strips"])
@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_a_directory_stating_more_pixels_than_its_tiles_hold_is_corrupt(tmp_path, backend, layout):
    """A header saying 200,000 px over 4 stored tiles read as white background: 'no tissue', exit 0."""
    if backend == "openslide":
        pytest.importorskip("openslide")
    path = tmp_path / "liar.tif"
    kw = {"tile": (256, 256)} if layout == "tiles" else {"rowsperstrip": 64}
    tifffile.imwrite(path, np.full((512, 512, 3), 200, np.uint8), photometric="rgb", metadata=None, **kw)
    open_slide(path, backend="tifffile").close()  # as written, it is whole
    _claim_size(path, 200_000, 200_000)
    with pytest.raises(CorruptSlide) as err:
        open_slide(path, backend=backend)
    needed = "611,524 tiles" if layout == "tiles" else "3,125 strips"
    assert f"says 200,000 x 200,000 px, which needs {needed}, but lists" in _one_line_naming(err, path)


def test_an_implausible_ome_pixel_size_is_named(tmp_path):
    """OME-TIFF PhysicalSizeX and an OME-Zarr scale of 50 um/px were dropped as 'no resolution'."""
    from test_slide_backends import pattern, write_ome_zarr

    from wsi_vssm.io import MissingMpp

    tiff = tmp_path / "ome50.ome.tif"
    tifffile.imwrite(tiff, pattern(64, 64), photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 50, "PhysicalSizeXUnit": "µm"})
    store = write_ome_zarr(tmp_path / "ome50.zarr", [pattern(64, 64)], scale=50.0)
    for path in (tiff, store):
        reader = open_slide(path)
        assert reader.mpp is None
        with pytest.raises(MissingMpp) as err:
            reader.require_mpp()
        assert "implausible 50 um/px (OME metadata" in _one_line_naming(err, path)
    assert open_slide(write_ome_zarr(tmp_path / "ok.zarr", [pattern(64, 64)], scale=0.5)).mpp == 0.5


def test_a_malformed_ome_zarr_scale_is_corrupt(tmp_path):
    from test_slide_backends import pattern, write_ome_zarr

    store = write_ome_zarr(tmp_path / "bad.zarr", [pattern(64, 64)])
    group = zarr.open_group(str(store), mode="a")
    meta = group.attrs["multiscales"]
    meta[0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [1, "abc", "abc"]
    group.attrs["multiscales"] = meta
    with pytest.raises(CorruptSlide, match="malformed OME-NGFF scale") as err:
        open_slide(store)
    _one_line_naming(err, store)


def test_planes_and_channels_left_unread_are_warned_about(tmp_path):
    """A page stack and a 7-channel image are read as their first page / first 3 channels: say so."""
    import warnings

    stack, seven, plain = tmp_path / "stack.tif", tmp_path / "seven.ome.tif", tmp_path / "plain.tif"
    tifffile.imwrite(stack, np.zeros((3, 64, 64, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(seven, np.zeros((7, 64, 64), np.uint8), metadata={"axes": "CYX"})
    tifffile.imwrite(plain, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    expected = {stack: "3 pages: only the first is read", seven: "7 channels: only the first 3 are read",
                plain: None}
    for path, note in expected.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            open_slide(path, backend="tifffile", mpp=0.5).close()
        notes = [str(w.message) for w in caught if "only the first" in str(w.message)]
        assert notes == ([] if note is None else [f"{path}: {note}"])


def test_api_misuse_is_a_usage_error_that_says_what_to_pass(tmp_path):
    """An image array, a PIL image or an openslide.OpenSlide given to open_slide raised a bare TypeError; a
    channel-first array became a 3-row image of 64 channels; mpp=0 divided by zero in read()."""
    import numpy as np

    from wsi_vssm.errors import UsageError
    from wsi_vssm.io import ArraySlide, SlideError, open_slide
    from wsi_vssm.pipeline.extract import extract_slide

    image = np.full((64, 64, 3), 200, np.uint8)
    with pytest.raises(UsageError, match="open_slide takes a path, got a ndarray; .*ArraySlide"):
        open_slide(image)
    with pytest.raises(UsageError, match="channel-first"):
        ArraySlide(np.moveaxis(image, -1, 0), mpp=1.0)
    with pytest.raises(UsageError, match="H x W or H x W x 3"):
        ArraySlide(np.zeros((2, 64, 64, 3), np.uint8), mpp=1.0)
    for bad in (0, -1, float("nan"), "1"):
        with pytest.raises(UsageError, match="mpp must be a positive number"):
            ArraySlide(image, mpp=bad)
    slide = ArraySlide(image, mpp=np.float32(1.0))
    for mpp in (0, -1, float("nan"), "1", None, True):  # a string or None was a bare TypeError
        with pytest.raises(SlideError, match="read: mpp must be a positive number"):
            slide.read(0, 0, 10, 10, mpp=mpp)
    for box in ((0, 0, -5, 10), (0, 0, "10", 10), (None, 0, 10, 10)):
        with pytest.raises(SlideError, match="positive size"):
            slide.read(*box, mpp=1.0)
    assert slide.read(np.int64(0), np.float32(0), np.int32(10), 10, mpp=np.float64(1.0)).shape == (10, 10, 3)
    with pytest.raises(UsageError, match="extract_slide takes an open slide"):
        extract_slide(image, None, mpp=1.0)
