"""Reading a contours.geojson back (`read_contours_geojson`, the napari plugin's contours layer): ours, the forms
other tools write, and malformed files, each refused in one line naming the file and, where it helps, the feature."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.contours import read_contours_geojson, tumour_contours, write_contours_geojson

SQUARE = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]


def _feature(geometry=None, **properties) -> dict:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [SQUARE]} if geometry is None
            else geometry, "properties": properties}


def _fc(*features) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


def _write(tmp_path, doc) -> str:
    path = tmp_path / "contours.geojson"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc, allow_nan=True))
    return path


def test_our_contours_read_back(tmp_path):
    prob = np.zeros((20, 20), np.float32)
    prob[2:10, 2:8] = 0.9
    prob[4:6, 4:6] = 0.1  # a hole
    prob[14:17, 14:17] = 0.7
    polys = tumour_contours(prob, 0.5, 4.0, (100.0, 200.0))
    path = tmp_path / "contours.geojson"
    write_contours_geojson(path, polys, [0.9, 0.7], slide_mpp=0.5, lesions=[(1, "micro"), (2, "itc")])
    feats = read_contours_geojson(path)
    assert [f.name for f in feats] == ["Lesion 1 (micro)", "Lesion 2 (itc)"]
    assert [len(f.rings) for f in feats] == [2, 1]  # shell and hole; shell
    assert [f.max_probability for f in feats] == pytest.approx([0.9, 0.7])
    assert feats[0].properties["lesion_id"] == 1 and feats[0].properties["measurements"]["Area um^2"] > 0
    assert feats[1].rings[0].min(axis=0).tolist() == [156.0, 256.0]  # level-0 px, closing point dropped
    assert len(feats[1].rings[0]) == 4


@pytest.mark.parametrize("doc", [
    [_feature(name="a")],  # a bare array of Features, as some tools write
    _feature(name="a"),  # one Feature
    {"type": "FeatureCollection", "features": [_feature(name="a")]},
])
def test_a_feature_collection_an_array_of_features_or_one_feature(tmp_path, doc):
    (feat,) = read_contours_geojson(_write(tmp_path, doc))
    assert feat.name == "a" and [r.tolist() for r in feat.rings] == [SQUARE[:-1]]


def test_what_other_tools_write_that_is_no_error(tmp_path):
    doc = [_feature(measurements=[{"name": "Max probability", "value": 0.8}]),  # QuPath before 0.4
           {"type": "Feature", "geometry": None, "properties": None},  # GeoJSON's unlocated feature
           _feature({"type": "Point", "coordinates": [1, 2]}, name="p"),  # no area: no rings
           _feature({"type": "Polygon", "coordinates": [[[0, 0, 5], [4, 0, 5], [4, 4, 5]]]})]  # unclosed, 3-D
    feats = read_contours_geojson(_write(tmp_path, doc))
    assert feats[0].max_probability == 0.8 and feats[0].properties["measurements"] == {"Max probability": 0.8}
    assert feats[1].name == "Tumor 2" and feats[1].rings == [] and math.isnan(feats[1].max_probability)
    assert feats[2].rings == []
    assert feats[3].rings[0].tolist() == [[0, 0], [4, 0], [4, 4]]


@pytest.mark.parametrize("doc, says", [
    ("{not json", "not a contours GeoJSON: JSONDecodeError"),
    ("3", "3 is not a FeatureCollection, a Feature or an array of Features"),
    ('"features"', '"features" is not a FeatureCollection'),
    ({"type": "FeatureCollection", "features": {"0": _feature()}}, "'features' is {\"0\""),
    ({"type": "FeatureCollection", "features": "abc"}, "'features' is \"abc\", not an array"),
    ({"type": "FeatureCollection"}, "an object with no 'features' array"),
    (_fc(1), "feature 0 is 1, not a GeoJSON Feature object"),
    (_fc(_feature(), {"type": "Polygon", "coordinates": [SQUARE]}), "feature 1 is {\"type\": \"Polygon\""),
    (_fc({"type": "Feature", "geometry": None, "properties": [1, 2]}),
     "feature 0: properties is [1, 2], not an object"),
    (_fc({"type": "Feature", "geometry": None, "properties": "x"}), "feature 0: properties is \"x\", not an object"),
    (_fc({"type": "Feature", "geometry": None, "properties": ""}), "feature 0: properties is \"\", not an object"),
    (_fc(_feature(measurements="0.9")), "feature 0: measurements is \"0.9\", not an object"),
    (_fc(_feature(measurements=[0.9])), "feature 0: measurements is [0.9], not an object"),
    (_fc(_feature(measurements=[{"name": [1]}])), "feature 0: measurements is [{\"name\": [1]}], not an object"),
    (_fc(_feature(measurements={"Max probability": "high"})),
     "measurement 'Max probability' is \"high\", not a number"),
    (_fc(_feature(measurements={"Max probability": True})), "measurement 'Max probability' is true, not a number"),
    (_fc(_feature(measurements={"Max probability": 10**400})), "measurement 'Max probability' is 1000"),
    (_fc(_feature(measurements={"Area um^2": [1]})), "measurement 'Area um^2' is [1], not a number"),
    (_fc(_feature(lesion_id="2")), "feature 0: lesion_id is \"2\", not a whole number"),
    (_fc(_feature("Polygon")), "feature 0: geometry is \"Polygon\", not a GeoJSON geometry"),
    (_fc(_feature({"type": "Circle", "radius": 3})), "feature 0: geometry is {\"type\": \"Circle\""),
    (_fc(_feature({"type": "Polygon", "coordinates": "x"})), "feature 0: Polygon coordinates are \"x\", not lists"),
    (_fc(_feature({"type": "Polygon", "coordinates": [[[0, 0], ["1", 0], [1, 1], [0, 0]]]})),
     "feature 0: ring 0, position 1 is [\"1\", 0], not [x, y] finite numbers"),
    (_fc(_feature({"type": "Polygon", "coordinates": [[[0, 0], [1], [1, 1], [0, 0]]]})),
     "feature 0: ring 0, position 1 is [1], not [x, y]"),
    (_fc(_feature({"type": "Polygon", "coordinates": [[[0, 0], [1, float("nan")], [1, 1], [0, 0]]]})),
     "feature 0: ring 0, position 1 is [1, NaN]"),
    (_fc(_feature({"type": "Polygon", "coordinates": [[[0, 0], [10**400, 0], [1, 1], [0, 0]]]})),
     "feature 0: ring 0, position 1 is [1000"),
    (_fc(_feature({"type": "Polygon", "coordinates": [0]})), "feature 0: ring 0 is 0, not an array"),
    (_fc(_feature({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]})),
     "feature 0: ring 0 has 2 corner(s)"),
    (_fc(_feature(), _feature({"type": "MultiPolygon", "coordinates": [[SQUARE], [[[0, 0], [1, "a"]]]]})),
     "feature 1: polygon 1, ring 0, position 1 is [1, \"a\"]"),
])
def test_a_malformed_file_is_one_line_naming_it(tmp_path, doc, says):
    path = _write(tmp_path, doc)
    with pytest.raises(UsageError) as err:
        read_contours_geojson(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{path}: ")
    assert says in str(err.value), str(err.value)


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "contours.geojson"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(UsageError, match="contours.geojson: not a contours GeoJSON: UnicodeDecodeError"):
        read_contours_geojson(path)
