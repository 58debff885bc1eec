"""Per-slide outputs: atomic writes, the OME-Zarr heatmap and its alignment, contours/GeoJSON, the overlay."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr
from PIL import Image

from wsi_vssm.atomic import atomic_dir, atomic_file, atomic_write_bytes, atomic_write_json, atomic_write_text
from wsi_vssm.errors import UsageError
from wsi_vssm.io.annotations import rasterize, read_annotations
from wsi_vssm.outputs.contours import contours_geojson, max_probability, tumour_contours, write_contours_geojson
from wsi_vssm.outputs.heatmap import heatmap_transform, pyramid, read_heatmap_zarr, write_heatmap_zarr
from wsi_vssm.outputs.overlay import heatmap_on_grid, overlay_png


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]


# ---- atomic writes -------------------------------------------------------------------------------------------
def test_atomic_write_roundtrip(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    atomic_write_json(tmp_path / "j.json", {"z": 1, "a": float("nan"), "b": np.float32(0.5), "c": (1, np.int64(2))})
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    text = (tmp_path / "j.json").read_text()
    assert json.loads(text) == {"z": 1, "a": None, "b": 0.5, "c": [1, 2]}
    assert list(json.loads(text)) == ["z", "a", "b", "c"]  # insertion order kept
    assert "NaN" not in text and text.startswith('{\n  "z"')
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "a") == []


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "prediction.json"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_a_failed_write_names_the_file_not_its_temporary(tmp_path, monkeypatch):
    """`train cells` into a locked folder said ".tmp-m.log.csv.x3loa0dn: Operation not permitted"."""
    import errno
    import tempfile

    def refused(*args, dir=None, prefix="", **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", os.path.join(dir, f"{prefix}x3loa0dn"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    with pytest.raises(PermissionError) as err:
        atomic_write_text(tmp_path / "m.log.csv", "x")
    assert err.value.filename == str(tmp_path / "m.log.csv") and err.value.errno == errno.EPERM
    with pytest.raises(PermissionError) as err, atomic_dir(tmp_path / "h.zarr"):
        pass
    assert err.value.filename == str(tmp_path / "h.zarr")


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch, capsys):
    """A full disk while evaluate wrote its report said only "wsi-vssm: error: No space left on device": the
    write on the open temporary raises without a file name. Now the file, and what to do, are named."""
    import errno

    from wsi_vssm.cli import main

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        with pytest.raises(OSError) as err:
            atomic_write_text(tmp_path / "metrics.json", "{}")
    assert err.value.filename == str(tmp_path / "metrics.json") and err.value.errno == errno.ENOSPC
    assert _leftovers(tmp_path) == [] and not (tmp_path / "metrics.json").exists()

    def full_report(*a, **k):
        atomic_write_text(tmp_path / "c" / "reference.csv", "x")

    monkeypatch.setattr("wsi_vssm.synth.make_cohort", full_report)
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit) as code:
        main(["synth", str(tmp_path / "c"), "--slides", "1", "--seed", "0"])
    line = capsys.readouterr().err.strip()
    assert code.value.code == 1 and line == (f"wsi-vssm: error: {tmp_path / 'c' / 'reference.csv'}: No space left "
                                             "on device; free space on its disk, then run the same command again")


def test_cleaning_one_long_names_temporaries_spares_anothers(tmp_path):
    """Review: temporaries of names past 200 bytes were cut to their first 200 bytes, so cleaning up one slide's
    (`remove_temporaries`) deleted another's live one when the two names shared their start."""
    import tempfile

    from wsi_vssm.atomic import _tmp_stem, remove_temporaries

    a, b = "s" * 200 + "_A", "s" * 200 + "_B"
    with atomic_dir(tmp_path / f"{b}.zarr") as live:
        (live / "x").write_text("1")
        left = Path(tempfile.mkdtemp(prefix=f".tmp-{_tmp_stem(f'{a}.zarr')}.", dir=tmp_path))  # A's, from a crash
        remove_temporaries(tmp_path, f"{a}.zarr.")
        assert live.is_dir() and not left.exists()
    assert (tmp_path / f"{b}.zarr" / "x").read_text() == "1"


def test_cleaning_one_files_temporaries_spares_a_longer_name_that_starts_with_it(tmp_path):
    """Review: clearing slide `x`'s h5 temporaries (`.tmp-x.h5.*`) also took slide `x.h5`'s (`.tmp-x.h5.h5.*`)."""
    import tempfile

    from wsi_vssm.atomic import remove_temporaries

    with atomic_file(tmp_path / "x.h5.h5") as live:  # slide `x.h5`'s h5 file, being written
        live.write_text("1")
        fd, mine = tempfile.mkstemp(prefix=".tmp-x.h5.", dir=tmp_path)  # slide `x`'s, left by a crash
        os.close(fd)
        own = [Path(mine), tmp_path / ".tmp-x.h5.old-0123abcd"]
        own[1].mkdir()
        remove_temporaries(tmp_path, "x.h5.")
        assert live.exists() and not any(p.exists() for p in own)
    assert (tmp_path / "x.h5.h5").read_text() == "1"


def test_atomic_write_json_rejects_unserialisable(tmp_path):
    target = tmp_path / "m.json"
    target.write_text("old")
    with pytest.raises(UsageError, match="m.json"):
        atomic_write_json(target, {"x": {1, 2}})
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_atomic_dir_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "store.zarr"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("1")
        assert not target.exists()  # nothing visible until the block ends
    assert (target / "v").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError("crash mid-way")
    assert (target / "v").read_text() == "1"  # old version intact
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["w"]  # replaced wholesale
    assert _leftovers(tmp_path) == []


def test_on_windows_a_file_held_open_is_waited_for_then_named(tmp_path, monkeypatch):
    """Windows refuses to replace a file another program holds open (Excel showing predictions.csv): the
    report step failed at once with "The process cannot access the file", and no metrics.json was written."""
    import errno

    import wsi_vssm.atomic as atomic

    real, calls = os.replace, []

    def held(src, dst, busy):
        calls.append(dst)
        if len(calls) <= busy:
            raise PermissionError(errno.EACCES, "The process cannot access the file", str(dst))
        real(src, dst)

    monkeypatch.setattr(atomic.time, "sleep", lambda s: None)
    monkeypatch.setattr(atomic, "_WINDOWS", True)
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: held(a, b, busy=3))
    atomic_write_text(tmp_path / "predictions.csv", "a\n")  # a reader let go: written on the fourth try
    assert (tmp_path / "predictions.csv").read_text() == "a\n" and len(calls) == 4
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: held(a, b, busy=10**6))
    with pytest.raises(PermissionError, match=r"another program holds it open \(a spreadsheet\?\): close it there "
                                              r"and run again .*predictions\.csv"):
        atomic_write_text(tmp_path / "predictions.csv", "b\n")
    assert (tmp_path / "predictions.csv").read_text() == "a\n" and _leftovers(tmp_path) == []
    monkeypatch.setattr(atomic, "_WINDOWS", False)  # elsewhere a refusal is final at once
    calls.clear()
    with pytest.raises(PermissionError):
        atomic_write_text(tmp_path / "predictions.csv", "c\n")
    assert len(calls) == 1


def test_zarr_stores_are_flushed_through_handles_that_may_write_on_windows(tmp_path, monkeypatch):
    """Windows' fsync needs a handle that may write: through a read-only one every zarr output failed ("Bad file
    descriptor": every slide of `predict`, every `extract`)."""
    import wsi_vssm.atomic as atomic

    assert atomic._FSYNC_FLAGS == os.O_RDONLY  # here (POSIX), read-only handles flush
    opened = []
    real_open = os.open
    monkeypatch.setattr(atomic, "_FSYNC_FLAGS", os.O_RDWR)
    monkeypatch.setattr(atomic.os, "open", lambda p, flags, *a: opened.append(flags) or real_open(p, flags, *a))
    with atomic_dir(tmp_path / "store.zarr") as tmp:
        (tmp / "v").write_text("1")
    assert os.O_RDWR in opened


def test_atomic_outputs_are_readable_by_others(tmp_path):
    """mkstemp / mkdtemp make 0600 files and 0700 folders: a shared results folder would hide them."""
    import stat

    atomic_write_bytes(tmp_path / "f.bin", b"x")
    with atomic_dir(tmp_path / "d.zarr") as tmp:
        (tmp / "v").write_text("1")
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d.zarr").stat().st_mode) == 0o755


# ---- heatmap -------------------------------------------------------------------------------------------------
def _validate_ngff_04(path: Path) -> dict:
    """The NGFF 0.4 structure we promise: a zarr v2 group with multiscales, axes, datasets and transforms."""
    assert (path / ".zgroup").exists() and json.loads((path / ".zgroup").read_text())["zarr_format"] == 2
    attrs = json.loads((path / ".zattrs").read_text())
    (ms,) = attrs["multiscales"]
    assert ms["version"] == "0.4"
    axes = ms["axes"]
    assert [a["name"] for a in axes] == ["y", "x"]
    assert all(a["type"] == "space" and a["unit"] == "micrometer" for a in axes)
    group = zarr.open_group(str(path), mode="r")
    prev = 0.0
    for ds in ms["datasets"]:
        meta = json.loads((path / ds["path"] / ".zarray").read_text())
        assert meta["dimension_separator"] == "/" and meta["dtype"] == "<f4"
        assert group[ds["path"]].ndim == len(axes)
        ts = ds["coordinateTransformations"]
        assert ts[0]["type"] == "scale" and len(ts[0]["scale"]) == 2
        assert len(ts) == 1 or (len(ts) == 2 and ts[1]["type"] == "translation" and len(ts[1]["translation"]) == 2)
        assert ts[0]["scale"][0] > prev  # finest first
        prev = ts[0]["scale"][0]
    return attrs


def test_heatmap_writes_valid_ngff_and_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    prob = rng.random((300, 520)).astype(np.float32)
    prob[:10] = np.nan
    path = tmp_path / "s1" / "heatmap.ome.zarr"
    write_heatmap_zarr(path, prob, cell0=128.0, origin=(0, 0), slide_mpp=0.25, attrs={"slide": "s1", "threshold": 0.5})
    attrs = _validate_ngff_04(path)
    assert [d["path"] for d in attrs["multiscales"][0]["datasets"]] == ["0", "1", "2"]  # 520 -> 260 -> 130 < 256
    assert attrs["wsi_vssm"]["slide"] == "s1" and attrs["wsi_vssm"]["cell_um"] == 32.0
    back, cell_um, _, _ = read_heatmap_zarr(path)
    np.testing.assert_array_equal(back, np.nan_to_num(prob, nan=0.0))
    assert cell_um == 32.0
    coarse, cell_um2, _, _ = read_heatmap_zarr(path, level=1)
    assert coarse.shape == (150, 260) and cell_um2 == 64.0
    assert coarse[7, 11] == np.nanmax(prob[14:16, 22:24])  # max-pooling
    assert _leftovers(path.parent) == []
    with pytest.raises(UsageError, match=r"level 3 does not exist; the heatmap has 3 level\(s\), 0-2"):
        read_heatmap_zarr(path, level=3)  # was "not a wsi-vssm heatmap"


def test_a_heatmap_chunk_that_does_not_decode_is_one_line(tmp_path):
    """blosc's RuntimeError on a damaged chunk was a traceback from `info` and `evaluate --annotations`."""
    path = tmp_path / "heatmap.ome.zarr"
    write_heatmap_zarr(path, np.full((8, 8), 0.5, np.float32), cell0=32.0, origin=(0, 0), slide_mpp=0.5)
    chunk = next(p for p in (path / "0").rglob("*") if p.is_file() and not p.name.startswith("."))
    chunk.write_bytes(b"junk")
    with pytest.raises(UsageError, match=r"heatmap\.ome\.zarr: damaged heatmap"):
        read_heatmap_zarr(path)


def test_a_heatmap_declaring_more_cells_than_a_slide_has_is_refused_before_it_is_read(tmp_path):
    """1 KB of metadata declaring 60,000 x 60,000 cells made `info`, napari and a threshold-only rerun allocate
    13.4 GiB (the chunks need not exist: missing ones read as fill)."""
    path = tmp_path / "heatmap.ome.zarr"
    write_heatmap_zarr(path, np.full((8, 8), 0.5, np.float32), cell0=32.0, origin=(0, 0), slide_mpp=0.5)
    meta = path / "0" / ".zarray"
    attrs = json.loads(meta.read_text())
    attrs["shape"] = [60000, 60000]
    meta.write_text(json.dumps(attrs))
    with pytest.raises(UsageError, match=r"heatmap\.ome\.zarr: damaged heatmap: level 0 declares 60000 x 60000 "
                                         r"cells, more than a slide has"):
        read_heatmap_zarr(path)


def test_a_missing_heatmap_chunk_is_found_not_read_as_background(tmp_path):
    """zarr reads an absent chunk as the fill value (0, "no tissue"): a chunk lost in a copy made a threshold-only
    rerun find no lesions there. Every chunk is written now, all-background ones too, and a missing one is named."""
    path = tmp_path / "heatmap.ome.zarr"
    prob = np.zeros((300, 300), np.float32)  # chunks of 256: the last three hold no tissue at all
    prob[:10, :10] = 0.9
    write_heatmap_zarr(path, prob, cell0=32.0, origin=(0, 0), slide_mpp=0.5)
    chunks = sorted(p for p in (path / "0").rglob("*") if p.is_file() and not p.name.startswith("."))
    assert len(chunks) == 4, "background chunks are on disk too"
    np.testing.assert_array_equal(read_heatmap_zarr(path)[0], prob)
    chunks[0].unlink()  # the chunk with the tumour
    with pytest.raises(UsageError, match=r"heatmap\.ome\.zarr: damaged heatmap: 1 of 4 chunks of level 0 missing"):
        read_heatmap_zarr(path)
    assert read_heatmap_zarr(path, level=1)[0].max() == pytest.approx(0.9), "the other levels still read"


def test_pyramid_keeps_a_single_hot_cell():
    prob = np.zeros((1000, 700), np.float32)
    prob[333, 555] = 0.9
    levels = pyramid(prob)
    assert max(levels[-1].shape) < 256 and max(levels[-2].shape) >= 256
    assert all(level.max() == pytest.approx(0.9) for level in levels)


@pytest.mark.parametrize("cell0,origin,mpp", [(8.0, (16.0, 24.0), 0.5), (10.7, (3.3, 101.9), 0.2431)])
def test_heatmap_hot_cell_lands_on_its_slide_position(tmp_path, cell0, origin, mpp):
    prob = np.full((40, 30), np.nan, np.float32)
    prob[5:35, 4:26] = 0.1
    i, j = 17, 9
    prob[i, j] = 1.0
    write_heatmap_zarr(tmp_path / "h.zarr", prob, cell0, origin, mpp)
    # Independent reckoning: the cell's centre in level-0 px (edges at integers), then napari um where
    # slide pixel k (covering [k, k + 1)) has its centre at k * mpp.
    cx0, cy0 = origin[0] + (j + 0.5) * cell0, origin[1] + (i + 0.5) * cell0
    want_x, want_y = (cx0 - 0.5) * mpp, (cy0 - 0.5) * mpp
    back, scale, (ty, tx), _ = read_heatmap_zarr(tmp_path / "h.zarr")
    r, c = np.unravel_index(np.argmax(back), back.shape)
    assert (r, c) == (i, j)
    assert c * scale + tx == pytest.approx(want_x) and r * scale + ty == pytest.approx(want_y)
    # Integer cells: the cell's centre is also the mean of the centres of the slide pixels it covers.
    if cell0 == 8.0:
        pixels = np.arange(origin[0] + j * cell0, origin[0] + (j + 1) * cell0)
        assert want_x == pytest.approx(pixels.mean() * mpp)
    # Coarser levels (a small min_side, so that this 40 x 30 grid has some): a pooled pixel's centre is the mean
    # of the centres of the level-0 cells it pools, and the hot cell lies inside it.
    write_heatmap_zarr(tmp_path / "p.zarr", prob, cell0, origin, mpp, min_side=8)
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    datasets = group.attrs["multiscales"][0]["datasets"]
    assert len(datasets) == 4  # 40 -> 20 -> 10 -> 5 rows
    for k, ds in enumerate(datasets):
        f = 2**k
        s, t = ds["coordinateTransformations"][0]["scale"], ds["coordinateTransformations"][1]["translation"]
        assert s == pytest.approx([scale * f, scale * f])
        row, col = i // f, j // f
        assert group[ds["path"]][row, col] == 1.0
        pooled_x = [(c * scale + tx) for c in range(col * f, col * f + f)]
        pooled_y = [(r * scale + ty) for r in range(row * f, row * f + f)]
        assert col * s[1] + t[1] == pytest.approx(np.mean(pooled_x))
        assert row * s[0] + t[0] == pytest.approx(np.mean(pooled_y))
        assert abs(col * s[1] + t[1] - want_x) <= s[1] / 2 + 1e-9


def test_heatmap_transform_matches_docstring():
    scale, (ty, tx) = heatmap_transform(32.0, (100.0, 200.0), 0.5)
    assert scale == 16.0 and tx == (100 + 16 - 0.5) * 0.5 and ty == (200 + 16 - 0.5) * 0.5


def test_heatmap_failure_mid_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "heatmap.ome.zarr"
    write_heatmap_zarr(path, np.full((600, 600), 0.25, np.float32), 4.0, (0, 0), 0.5)
    real = zarr.Group.create_array
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_heatmap_zarr(path, np.full((600, 600), 0.75, np.float32), 4.0, (0, 0), 0.5)
    monkeypatch.undo()
    back, *_ = read_heatmap_zarr(path)
    assert float(back.max()) == 0.25
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prob": np.zeros((3,), np.float32)},
        {"prob": np.zeros((0, 4), np.float32)},
        {"cell0": 0},
        {"cell0": float("nan")},
        {"origin": (1,)},
        {"slide_mpp": -1},
    ],
)
def test_heatmap_rejects_bad_input_in_one_line(tmp_path, kwargs):
    args = {"prob": np.zeros((4, 4), np.float32), "cell0": 4.0, "origin": (0, 0), "slide_mpp": 0.5, **kwargs}
    with pytest.raises(UsageError) as err:
        write_heatmap_zarr(tmp_path / "h.zarr", **args)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "h.zarr").exists()


def test_read_heatmap_of_non_heatmap_is_one_line_error(tmp_path):
    with pytest.raises(UsageError, match="not a wsi-vssm heatmap"):
        read_heatmap_zarr(tmp_path / "missing.zarr")


# ---- contours ------------------------------------------------------------------------------------------------
def _disk(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_contours_of_a_blob_match_its_cells(tmp_path):
    cell0, origin = 12.5, (300.0, 40.0)
    prob = np.full((60, 80), 0.1, np.float32)
    blob = _disk(prob.shape, (30, 30), 12)
    prob[blob] = 0.8
    prob[30, 30] = 0.95
    prob[:3] = np.nan
    polys = tumour_contours(prob, 0.5, cell0, origin)
    assert len(polys) == 1 and polys[0].is_valid
    assert polys[0].area == pytest.approx(blob.sum() * cell0**2)
    # Exact: rasterising the contour back onto the grid (cell centres) gives the cells again.
    np.testing.assert_array_equal(rasterize(polys[0], prob.shape, origin=origin, downsample=cell0), blob)
    # Collinear vertices along straight runs are gone: no more vertices than boundary turns.
    assert len(polys[0].exterior.coords) - 1 <= 4 * 2 * 12 + 4
    assert max_probability(polys, prob, cell0, origin) == [pytest.approx(0.95)]


def test_max_probability_counts_every_cell_whose_centre_a_polygon_holds():
    # Cells 10 px wide from (0, 0): a polygon to x = 26 holds the centres at 5, 15 and 25, not 35.
    prob = np.array([[0.1, 0.2, 0.9, 0.95]], np.float32)
    assert max_probability([shapely.box(0, 0, 26, 10)], prob, 10.0, (0.0, 0.0)) == [pytest.approx(0.9)]
    assert max_probability([shapely.box(0, 0, 24, 10)], prob, 10.0, (0.0, 0.0)) == [pytest.approx(0.2)]
    assert max_probability([shapely.box(100, 0, 120, 10)], prob, 10.0, (0.0, 0.0)) == [None]  # off the grid


def test_contours_keep_holes_split_corners_and_drop_small():
    prob = np.zeros((20, 20), np.float32)
    prob[2:9, 2:9] = 1.0
    prob[4:7, 4:7] = 0.0  # a 3 x 3 hole
    prob[12, 12] = prob[13, 13] = 1.0  # two cells touching at a corner
    prob[17, 2:5] = 1.0  # a 3-cell strip
    polys = tumour_contours(prob, 0.5, 1.0, (0, 0))
    assert [len(p.interiors) for p in polys] == [1, 0, 0, 0]
    assert polys[0].area == 49 - 9 and polys[1].area == 3
    assert [p.area for p in tumour_contours(prob, 0.5, 1.0, (0, 0), min_area_cells=2)] == [40, 3]
    assert tumour_contours(np.full((4, 4), np.nan, np.float32), 0.5, 1.0, (0, 0)) == []


def test_geojson_has_qupath_fields_and_reads_back(tmp_path):
    prob = np.zeros((30, 30), np.float32)
    prob[5:15, 5:12] = 0.9
    prob[8:10, 7:9] = 0.2  # hole
    prob[20:25, 20:25] = 0.7
    cell0, origin, mpp = 16.0, (1000.0, 2000.0), 0.5
    polys = tumour_contours(prob, 0.5, cell0, origin)
    path = tmp_path / "contours.geojson"
    write_contours_geojson(path, polys, max_probability(polys, prob, cell0, origin), slide_mpp=mpp, slide="s1")
    fc = json.loads(path.read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 2
    f0 = fc["features"][0]
    assert f0["geometry"]["type"] == "Polygon" and len(f0["geometry"]["coordinates"]) == 2  # shell + hole
    props = f0["properties"]
    assert props["objectType"] == "annotation"
    assert props["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert props["measurements"]["Max probability"] == pytest.approx(0.9)
    assert props["measurements"]["Area um^2"] == pytest.approx((70 - 4) * cell0**2 * mpp**2)
    assert shapely.geometry.shape(f0["geometry"]).exterior.is_ccw  # RFC 7946 winding
    # Our own annotation reader (the QuPath path) sees the same tumour area.
    ann = read_annotations(path)
    assert ann.tumor.area == pytest.approx(sum(p.area for p in polys))
    # ... also when the contours carry predict's lesion categories (classes "Tumor: ITC" and the like).
    write_contours_geojson(path, polys, slide="s1", lesions=[(1, "micro"), (2, "itc")])
    classes = {f["properties"]["classification"]["name"] for f in json.loads(path.read_text())["features"]}
    assert classes == {"Tumor: micrometastasis", "Tumor: ITC"}
    assert read_annotations(path).tumor.area == pytest.approx(sum(p.area for p in polys))
    # An out-of-domain slide's outlines say so in QuPath's annotation list (the name) and to scripts (a property);
    # the classes, colours and what annotation readers take stay the same.
    write_contours_geojson(path, polys, slide="s1", lesions=[(1, "micro"), (2, "itc")], in_domain=False)
    feats = json.loads(path.read_text())["features"]
    assert [f["properties"]["name"] for f in feats] == ["Lesion 1 (micro) - OUT OF DOMAIN",
                                                         "Lesion 2 (itc) - OUT OF DOMAIN"]
    assert all(f["properties"]["in_domain"] is False for f in feats)
    assert {f["properties"]["classification"]["name"] for f in feats} == classes
    assert read_annotations(path).tumor.area == pytest.approx(sum(p.area for p in polys))
    inside = contours_geojson(polys, slide="s1", in_domain=True)["features"]
    assert inside[0]["properties"]["in_domain"] is True and inside[0]["properties"]["name"] == "Tumor 1"
    # Stable ids across reruns.
    assert contours_geojson(polys, slide="s1")["features"][0]["id"] == f0["id"]
    write_contours_geojson(tmp_path / "empty.geojson", [])
    assert json.loads((tmp_path / "empty.geojson").read_text()) == {"type": "FeatureCollection", "features": []}


# ---- overlay -------------------------------------------------------------------------------------------------
def test_heatmap_on_grid_samples_nearest_cells():
    prob = np.arange(12, dtype=np.float32).reshape(3, 4)
    # Slide 400 x 300 level-0 px, grid origin (100, 0), cell 50: covers x 100..300, y 0..150.
    out = heatmap_on_grid(prob, 50.0, (100, 0), (400, 300), (30, 40))  # thumbnail pixel = 10 px
    assert np.isnan(out[:, :10]).all() and np.isnan(out[:, 30:]).all() and np.isnan(out[15:]).all()
    assert out[0, 10] == 0 and out[0, 14] == 0 and out[0, 15] == 1 and out[14, 29] == 11


def test_overlay_png(tmp_path):
    thumb = np.full((100, 160, 3), 255, np.uint8)
    prob = np.full((10, 16), np.nan, np.float32)
    prob[2:5, 3:6] = 1.0
    path = tmp_path / "overlay.png"
    overlay_png(path, thumb, prob, 100.0, (0, 0), (1600, 1000), alpha=0.6, cmap="jet")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] >= 100 and img.shape[1] > 160  # thumbnail plus a colour bar
    assert (img[35, 45] != 255).any()  # inside the hot cells: coloured
    assert (img[80, 120] == 255).all()  # no tissue: the thumbnail as is
    assert _leftovers(tmp_path) == []
    with pytest.raises(UsageError, match="colour map"):
        overlay_png(path, thumb, prob, 100.0, (0, 0), (1600, 1000), cmap="nope")
    with pytest.raises(UsageError, match="thumbnail"):
        overlay_png(path, thumb[..., 0], prob, 100.0, (0, 0), (1600, 1000))


def test_outputs_import_stays_light():
    import subprocess
    import sys

    code = "import sys, wsi_vssm.outputs, wsi_vssm.atomic; print(any(m in sys.modules for m in ('zarr', 'matplotlib')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
