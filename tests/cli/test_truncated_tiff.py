"""A TIFF cut short (a partial copy or download) fails with one stderr line that names the file and says it is
truncated, through `info` and `predict`, with both TIFF backends; no traceback and no decoder log lines."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile

from wsi_vssm.io import CorruptSlide, open_slide
from wsi_vssm.io.formats import tiff_truncation

BACKENDS = ["tifffile", "openslide"]


def _pyramid(path) -> None:
    """A 1,024 px two-level zlib-tiled RGB TIFF of noise (every tile a few kB), as OpenSlide's generic TIFF."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (1024, 1024, 3), np.uint8)
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate((img, img[::4, ::4])):
            tw.write(level, tile=(128, 128), compression="zlib", photometric="rgb", resolution=(5000, 5000),
                     resolutionunit="CENTIMETER", subfiletype=int(i > 0), metadata=None)


def _cut(tmp_path, where: str):
    """The pyramid cut in the middle of level 0's tile data, or in the last tile of the file (every directory
    still there)."""
    whole = tmp_path / "whole.tif"
    _pyramid(whole)
    with tifffile.TiffFile(whole) as tf:
        offsets = tf.pages[0].dataoffsets
        end = max(o + n for p in tf.pages for o, n in zip(p.dataoffsets, p.databytecounts, strict=True))
    at = offsets[len(offsets) // 2] + 100 if where == "middle" else end - 100
    path = tmp_path / f"cut {where}.tif"
    path.write_bytes(whole.read_bytes()[:at])
    return path, at


@pytest.mark.parametrize("where", ["middle", "last-tile"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_open_says_truncated(tmp_path, backend, where):
    pytest.importorskip(backend)
    path, size = _cut(tmp_path, where)
    with pytest.raises(CorruptSlide) as err:
        open_slide(path, backend=backend)
    text = str(err.value)
    assert str(path) in text and "truncated" in text and f"file is {size} bytes" in text and "\n" not in text


def test_whole_files_are_not_truncated(tmp_path):
    _pyramid(tmp_path / "whole.tif")
    assert tiff_truncation(tmp_path / "whole.tif") is None
    assert tiff_truncation(__file__) is None  # not a TIFF: the backends say what it is


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "wsi_vssm", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_and_predict_say_truncated_in_one_line(tmp_path, model_file, backend):
    pytest.importorskip(backend)
    path, _ = _cut(tmp_path, "middle")
    for args in (["info", path], ["predict", path, "--model", model_file, "--out", tmp_path / "out"]):
        res = _cli(*args, "--backend", backend)  # a fresh process: library log lines would reach stderr
        assert res.returncode == 1, res.stderr
        assert res.stderr.count("\n") == 1, res.stderr  # exactly one line: no traceback, no tifffile log lines
        assert res.stderr.startswith("wsi-vssm: error: ") and "truncated" in res.stderr and path.name in res.stderr
