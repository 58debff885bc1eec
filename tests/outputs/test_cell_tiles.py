"""cells.geojson: the heatmap's tissue cells as QuPath tiles."""

import json

import numpy as np
import pytest
from shapely.geometry import shape

from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.cell_tiles import MEASUREMENT, write_cells_geojson


def _grid():
    g = np.full((3, 4), np.nan, np.float32)
    g[0, 1], g[1, 2], g[2, 3], g[2, 0] = 0.9, np.float32(0.781), 0.2, 0.0  # 0: no tissue, as the heatmap file
    g[1, 0] = np.nextafter(np.float32(0.781), np.float32(0))  # just under the threshold as float32
    return g


def test_every_tissue_cell_is_one_tile_on_its_cell_box(tmp_path):
    g, cell0, origin = _grid(), 128.5, (10.0, 20.0)
    n = write_cells_geojson(tmp_path / "c.geojson", g, cell0, origin, 0.781, about={"slide": "s1"})
    doc = json.loads((tmp_path / "c.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and n == len(doc["features"]) == 4
    assert doc["wsi_vssm"]["slide"] == "s1" and doc["wsi_vssm"]["measurement"] == MEASUREMENT
    seen = set()
    for f in doc["features"]:
        poly = shape(f["geometry"])
        x0, y0, x1, y1 = poly.bounds
        j, i = round((x0 - origin[0]) / cell0), round((y0 - origin[1]) / cell0)
        seen.add((i, j))
        assert (x0, y0, x1, y1) == pytest.approx((origin[0] + j * cell0, origin[1] + i * cell0,
                                                  origin[0] + (j + 1) * cell0, origin[1] + (i + 1) * cell0))
        assert poly.area == pytest.approx(cell0 * cell0) and poly.exterior.is_ccw  # exterior counter-clockwise
        p = f["properties"]
        assert p["objectType"] == "tile"
        assert np.float32(p["measurements"][MEASUREMENT]) == g[i, j]  # the heatmap's value, read back exactly
        assert ("classification" in p) == bool(g[i, j] >= np.float32(0.781))
    assert seen == {(0, 1), (1, 2), (2, 3), (1, 0)}  # NaN and 0 (no tissue) are left out
    tumour = [f for f in doc["features"] if "classification" in f["properties"]]
    assert [f["properties"]["classification"]["name"] for f in tumour] == ["Tumor", "Tumor"]


def test_a_slide_without_tissue_writes_an_empty_collection(tmp_path):
    n = write_cells_geojson(tmp_path / "c.geojson", np.full((2, 2), np.nan), 32.0, (0, 0), 0.5)
    assert n == 0 and json.loads((tmp_path / "c.geojson").read_text())["features"] == []


def test_bad_grids_are_refused_before_writing(tmp_path):
    with pytest.raises(UsageError, match="2-D"):
        write_cells_geojson(tmp_path / "c.geojson", np.zeros(3), 32.0, (0, 0), 0.5)
    with pytest.raises(UsageError, match="cell0"):
        write_cells_geojson(tmp_path / "c.geojson", np.zeros((2, 2)), 0.0, (0, 0), 0.5)
    with pytest.raises(UsageError, match="origin"):  # a bare NaN is not JSON
        write_cells_geojson(tmp_path / "c.geojson", np.ones((2, 2)), 32.0, (float("nan"), 0), 0.5)
    assert not (tmp_path / "c.geojson").exists()


def test_a_float32_cell_side_places_far_cells_as_a_float64_one(tmp_path):
    """A float32 cell0 (the Python API) made every edge float32: 227426.219 instead of 227426.23."""
    g = np.full((1, 2000), np.nan, np.float32)
    g[0, 1999] = 0.5
    write_cells_geojson(tmp_path / "c.geojson", g, np.float32(113.77), (0, 0), 0.5)
    ring = json.loads((tmp_path / "c.geojson").read_text())["features"][0]["geometry"]["coordinates"][0]
    assert ring[0][0] == round(1999 * float(np.float32(113.77)), 3) and ring[1][0] == round(
        2000 * float(np.float32(113.77)), 3)


def test_many_cells_are_written_in_batches_that_join_into_valid_json(tmp_path):
    rng = np.random.default_rng(0)
    g = rng.random((150, 300)).astype(np.float32)  # 45,000 cells: more than one batch
    n = write_cells_geojson(tmp_path / "c.geojson", g, 32.0, (0, 0), 0.5)
    feats = json.loads((tmp_path / "c.geojson").read_text())["features"]
    assert n == len(feats) == g.size
    got = np.array([f["properties"]["measurements"][MEASUREMENT] for f in feats], np.float32)
    assert np.array_equal(np.sort(got), np.sort(g.ravel()))
