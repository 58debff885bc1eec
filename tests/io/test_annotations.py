"""Annotation parsing (ASAP and ImageScope XML, GeoJSON) and rasterisation: real CAMELYON16 files and synthetic ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from conftest import SHARED_DATA, shared_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsi_vssm.errors import UsageError, WsiVssmError
from wsi_vssm.io.annotations import (
    AnnotationClasses,
    AnnotationError,
    AnnotationSet,
    NdpaFrame,
    parse_asap_xml,
    parse_geojson,
    parse_ndpa,
    read_annotations,
)

NAMES = ["tumor_009", "tumor_076", "tumor_085", "tissue_tumor_001", "tissue_normal_042"]


def _asap(*polys: tuple[str, str, list[tuple[float, float]]]) -> str:
    """An ASAP file with (name, group, points) polygons."""
    anns = []
    for name, group, pts in polys:
        coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(pts))
        anns.append(
            f'<Annotation Name="{name}" Type="Polygon" PartOfGroup="{group}"><Coordinates>{coords}'
            "</Coordinates></Annotation>"
        )
    return f"<ASAP_Annotations><Annotations>{''.join(anns)}</Annotations></ASAP_Annotations>"


def _square(x, y, s):
    return [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]


# ---- real files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_asap_and_geojson_versions_agree(name):
    a = read_annotations(shared_file("annotations", "camelyon16_asap", f"{name}.xml"))
    b = read_annotations(shared_file("annotations", "geojson", f"{name}.geojson"))
    assert sorted(a.classes) == sorted(b.classes)
    for kind in ("tumor", "excluded", "other"):
        ga, gb = a.geometry(kind), b.geometry(kind)
        assert ga.area == pytest.approx(gb.area, rel=1e-3, abs=1.0)
        assert ga.symmetric_difference(gb).area <= 1e-3 * max(ga.area, 1.0)


def test_real_lesion_areas_are_sane():
    ts = read_annotations(shared_file("annotations", "camelyon16_asap", "tumor_076.xml"))
    assert ts.classes.keys() == {"metastasis"}
    assert ts.excluded.is_empty and ts.other.is_empty
    # Lesions of a CAMELYON16 slide (about 0.243 um/px): between 0.01 and 1000 mm^2, inside a 100k px slide.
    mm2 = ts.tumor.area * 0.243**2 / 1e6
    assert 0.01 < mm2 < 1000
    x0, y0, x1, y1 = ts.tumor.bounds
    assert 0 <= x0 < x1 < 250_000 and 0 <= y0 < y1 < 250_000
    assert len(ts.tumor.geoms) > 5


def test_real_tissue_file_groups_and_excluded():
    ann = read_annotations(shared_file("annotations", "camelyon16_asap", "tissue_tumor_001.xml"))
    assert sorted(ann.classes) == ["artifact", "background", "tissue"]
    assert ann.tumor.is_empty
    assert ann.other.area == pytest.approx(ann.classes["tissue"].area)
    assert ann.excluded.area == pytest.approx(ann.classes["artifact"].union(ann.classes["background"]).area)
    # The same file with artifacts counted as tumour: tumour is their area, background still excluded.
    cfg = AnnotationClasses(tumor=("artifact",), excluded=("background",))
    as_tumor = read_annotations(shared_file("annotations", "camelyon16_asap", "tissue_tumor_001.xml"), cfg)
    assert as_tumor.tumor.area == pytest.approx(ann.classes["artifact"].area, rel=1e-6)


def test_real_mask_area_matches_polygon_area():
    ann = read_annotations(shared_file("annotations", "geojson", "tumor_085.geojson"))
    x0, y0, x1, y1 = ann.tumor.bounds
    d = 32.0
    m = ann.mask((x0, y0, x1 - x0, y1 - y0), downsample=d)
    assert m.sum() * d * d == pytest.approx(ann.tumor.area, rel=0.03)
    by_mpp = ann.mask((x0, y0, x1 - x0, y1 - y0), mpp=0.243 * 32, slide_mpp=0.243)
    np.testing.assert_array_equal(m, by_mpp)


def test_real_geojson_names_are_not_classes():
    # tumor_009's polygons are named _0 .. _5 inside the `metastasis` class: `_2` must not make an exclusion.
    path = SHARED_DATA / "annotations" / "geojson" / "tumor_009.geojson"
    ann = read_annotations(shared_file("annotations", "geojson", "tumor_009.geojson"))
    names = [f["properties"]["name"] for f in json.loads(path.read_text())["features"]]
    assert "_2" in names
    assert ann.excluded.is_empty and ann.tumor.area > 0


# ---- synthetic ---------------------------------------------------------------------------------------------
def test_camelyon_groups_exclusion_cuts_tumour():
    text = _asap(
        ("Annotation 0", "_0", _square(0, 0, 100)),
        ("Annotation 1", "_1", _square(200, 0, 50)),
        ("Annotation 2", "_2", _square(25, 25, 50)),  # a non-tumour island inside lesion 0
    )
    ann = AnnotationSet.from_items(parse_asap_xml(text))
    assert ann.tumor.area == pytest.approx(100 * 100 - 50 * 50 + 50 * 50)
    assert ann.excluded.area == pytest.approx(2500)
    m = ann.mask((20, 300), downsample=10)
    assert m[:10, :10].sum() == 100 - 25  # the island is a hole
    assert not m[4, 4] and m[0, 0] and m[2, 21]


def test_group_none_falls_back_to_annotation_name():
    ann = AnnotationSet.from_items(parse_asap_xml(_asap(("Tumor", "None", _square(0, 0, 10)))))
    assert ann.tumor.area == pytest.approx(100)


def test_geojson_qupath_multipolygon_with_holes_and_islands():
    outer = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    hole = [[20, 20], [80, 20], [80, 80], [20, 80], [20, 20]]
    island = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]
    far = [[200, 0], [220, 0], [220, 20], [200, 20], [200, 0]]
    fc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "MultiPolygon", "coordinates": [[outer, hole], [island], [far]]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tumor", "color": [1, 2, 3]},
                },
            },
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
        ],
    }
    ann = AnnotationSet.from_items(parse_geojson(json.dumps(fc)))
    assert ann.tumor.area == pytest.approx(100**2 - 60**2 + 20**2 + 20**2)
    m = ann.mask((100, 230), downsample=1)
    assert m[10, 10] and not m[30, 30] and m[50, 50] and m[10, 210] and not m[10, 150]
    assert m.sum() == pytest.approx(ann.tumor.area, rel=0.05)


def test_geojson_bare_geometry_and_feature_lists():
    poly = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    assert len(parse_geojson([poly, poly])) == 2
    feats = [{"type": "Feature", "geometry": poly, "properties": {"classification": "negative"}}]
    ((name, geom),) = parse_geojson(feats)
    assert name == "negative" and geom.area == pytest.approx(100)


def test_self_intersecting_outline_is_repaired():
    bowtie = [(0, 0), (10, 10), (10, 0), (0, 10)]
    ann = AnnotationSet.from_items(parse_asap_xml(_asap(("a", "_0", bowtie))))
    assert ann.tumor.is_valid and ann.tumor.area == pytest.approx(50)
    # an outline crossing itself keeps the area it encloses: a pentagram's centre was a hole (the "linework"
    # repair), and 600 crossing vertices took 103 s of GEOS, deaf to Ctrl-C
    import math

    star = [(100 * math.cos(math.pi / 2 + 4 * math.pi * k / 5), 100 * math.sin(math.pi / 2 + 4 * math.pi * k / 5))
            for k in range(5)]
    ann = AnnotationSet.from_items(parse_asap_xml(_asap(("a", "_0", star))))
    assert ann.tumor.is_valid and ann.tumor.contains(shapely.Point(0, 0))


def test_mask_box_offset_and_unknown_class():
    ann = AnnotationSet.from_items(parse_asap_xml(_asap(("a", "tumor", _square(100, 100, 40)))))
    m = ann.mask((80, 80, 80, 80), downsample=2)
    assert m.shape == (40, 40)
    assert m[10:30, 10:30].all() and m.sum() == 400
    with pytest.raises(UsageError, match="unknown annotation class"):
        ann.mask((10, 10), downsample=1, which="nope")
    with pytest.raises(UsageError, match="slide_mpp"):
        ann.mask((10, 10), mpp=1.0)


def test_class_config_rejects_overlap():
    with pytest.raises(UsageError, match="both tumour and excluded"):
        AnnotationClasses(tumor=("x",), excluded=("X",))


@pytest.mark.parametrize(
    ("content", "suffix", "match"),
    [
        ("<ASAP_Annotations><Annotations>", ".xml", "not valid XML"),
        ("<svg/>", ".xml", "not an ASAP, ImageScope or HALO annotation file"),
        (_asap(("a", "_0", [(0, 0), (1, "x"), (2, 2)])), ".xml", "bad coordinates"),
        (_asap(("a", "_0", [(0, 0), (1, "nan"), (2, 2)])), ".xml", "non-finite"),
        ("{not json", ".geojson", "not valid JSON"),
        ('{"type": "Polygon", "coordinates": 7}', ".geojson", "bad GeoJSON"),
        ('{"type": "Banana"}', ".json", "unknown GeoJSON type"),
        ('{"type": "FeatureCollection"}', ".json", "needs a list 'features'"),
    ],
)
def test_bad_files_raise_one_line_error_naming_the_file(tmp_path, content, suffix, match):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=match) as info:
        read_annotations(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    assert isinstance(info.value, WsiVssmError)


def test_missing_file(tmp_path):
    with pytest.raises(AnnotationError, match="cannot read"):
        read_annotations(tmp_path / "absent.xml")


# ---- fuzzing: anything but AnnotationError is a bug --------------------------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_geo_type = st.sampled_from(
    ["FeatureCollection", "Feature", "Polygon", "MultiPolygon", "GeometryCollection", "Point", "x"]
)
_coord = st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32) | st.integers(), max_size=3)
_geo = st.recursive(
    st.fixed_dictionaries(
        {"type": _geo_type, "coordinates": st.lists(st.lists(_coord, max_size=5), max_size=3)}
    ),
    lambda inner: st.fixed_dictionaries(
        {
            "type": _geo_type,
            "features": st.lists(inner, max_size=3),
            "geometry": inner,
            "geometries": st.lists(inner, max_size=3),
            "properties": _json,
        }
    ),
    max_leaves=6,
)
_FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_only_annotation_error(fn, data):
    try:
        items = fn(data)
    except AnnotationError as err:
        assert "\n" not in str(err)
        return
    AnnotationSet.from_items(items).mask((8, 8), downsample=1.0)


@_FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_fuzz_raw_bytes(data):
    _check_only_annotation_error(parse_asap_xml, data)
    _check_only_annotation_error(parse_geojson, data)


@_FUZZ
@given(_json | _geo)
def test_fuzz_geojson_structures(obj):
    _check_only_annotation_error(parse_geojson, obj)
    _check_only_annotation_error(parse_geojson, json.dumps(obj))


@_FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["Polygon", "Spline", "Dot", "Rectangle", ""]),
            st.text(max_size=5),
            st.lists(st.tuples(st.text(max_size=6), st.text(max_size=6), st.text(max_size=4)), max_size=5),
        ),
        max_size=4,
    )
)
def test_fuzz_asap_structures(anns):
    parts = []
    for kind, group, coords in anns:
        c = "".join(f"<Coordinate Order={_attr(o)} X={_attr(x)} Y={_attr(y)}/>" for x, y, o in coords)
        head = f"<Annotation Type={_attr(kind)} PartOfGroup={_attr(group)}>"
        parts.append(f"{head}<Coordinates>{c}</Coordinates></Annotation>")
    body = "".join(parts)
    _check_only_annotation_error(
        parse_asap_xml, f"<ASAP_Annotations><Annotations>{body}</Annotations></ASAP_Annotations>"
    )


def _attr(s: str) -> str:
    return '"' + s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;") + '"'


IMAGESCOPE = """<?xml version="1.0" encoding="ISO-8859-1"?>
<Annotations MicronsPerPixel="0.252100">
<Annotation Id="1" Name="Tumor" Type="4" LineColor="65280" Visible="1">
  <Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes>
  <Regions>
    <Region Id="1" Type="0" NegativeROA="0" Text="">
      <Vertices><Vertex X="0" Y="0" Z="0"/><Vertex X="1000" Y="0" Z="0"/><Vertex X="1000" Y="1000" Z="0"/>
        <Vertex X="0" Y="1000" Z="0"/></Vertices>
    </Region>
    <Region Id="2" Type="0" NegativeROA="1" Text="">
      <Vertices><Vertex X="400" Y="400"/><Vertex X="600" Y="400"/><Vertex X="600" Y="600"/><Vertex X="400" Y="600"/>
      </Vertices>
    </Region>
    <Region Id="3" Type="2" NegativeROA="0" Text="">
      <Vertices><Vertex X="2000" Y="0"/><Vertex X="2400" Y="200"/></Vertices>
    </Region>
    <Region Id="4" Type="3" NegativeROA="0" Text="look here">
      <Vertices><Vertex X="0" Y="0"/><Vertex X="50" Y="50"/></Vertices>
    </Region>
  </Regions>
</Annotation>
<Annotation Id="2" Name="" Type="4">
  <Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes>
  <Regions>
    <Region Id="1" Type="1" Text="Tissue">
      <Vertices><Vertex X="0" Y="5000"/><Vertex X="300" Y="5000"/><Vertex X="300" Y="5100"/><Vertex X="0" Y="5100"/>
      </Vertices>
    </Region>
  </Regions>
</Annotation>
<Annotation Id="3" Name="" Type="4">
  <Attributes><Attribute Name="metastasis" Id="0" Value=""/></Attributes>
  <Regions>
    <Region Id="1" Type="1" Text="">
      <Vertices><Vertex X="8000" Y="0"/><Vertex X="8100" Y="0"/><Vertex X="8100" Y="100"/><Vertex X="8000" Y="100"/>
      </Vertices>
    </Region>
  </Regions>
</Annotation>
</Annotations>
"""


def test_aperio_imagescope_xml_is_read(tmp_path):
    """ImageScope's annotations are what SVS users have; they were refused as "not an ASAP annotation file".
    Layers name the class (else their attribute, else the region's text); a negative region is cut out of its
    layer; ellipses are read from their bounding box; arrows have no area."""
    import math

    path = tmp_path / "slide.xml"
    path.write_text(IMAGESCOPE, encoding="latin-1")
    ann = read_annotations(path)
    assert sorted(ann.classes) == ["Tissue", "Tumor", "metastasis"]
    assert ann.classes["Tumor"].area == pytest.approx(1000 * 1000 - 200 * 200 + math.pi * 200 * 100, rel=0.01)
    assert ann.tumor.area == pytest.approx(ann.classes["Tumor"].area + 100 * 100, rel=1e-6)
    assert ann.other.area == pytest.approx(300 * 100) and ann.excluded.is_empty
    assert not ann.tumor.contains(shapely.Point(500, 500)) and ann.tumor.contains(shapely.Point(2200, 100))


# ---- annotation files as other tools write them (a review's probe) --------------------------------------------
SQUARE = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]


def _feature(classification, object_type="annotation", coords=SQUARE, **extra):
    props = {"objectType": object_type, "classification": classification, **extra}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [coords]}, "properties": props}


@pytest.mark.parametrize("classification", [
    {"names": ["Tumor", "Positive"], "color": [200, 50, 50]},  # QuPath 0.4+
    {"parentClass": {"name": "Tumor", "colorRGB": -3670016}, "name": "Positive", "colorRGB": -3670016},  # 0.2/0.3
], ids=["qupath-0.5", "qupath-0.3"])
def test_qupath_derived_classes_are_their_base_class(tmp_path, classification):
    """A "Tumor: Positive" annotation read as class '' (tumour empty) or 'Positive' (other): the FROC and the
    patients' reference stages lost the lesion."""
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [_feature(classification)]}))
    ann = read_annotations(path)
    assert list(ann.classes) == ["Tumor: Positive"] and ann.tumor.area == pytest.approx(100 * 100)


def test_qupath_detections_cells_and_tiles_are_not_lesions(tmp_path):
    """An "all objects" export put every tumour-classed cell and tile into the tumour area (64 cells: 64 ITCs in
    the FROC, without a word)."""
    features = [_feature({"name": "Tumor"}),
                _feature({"name": "Tumor"}, "cell", [[500, 500], [510, 500], [510, 510], [500, 510], [500, 500]],
                         measurements={"Nucleus: Area": 50.0}),
                _feature({"name": "Tumor"}, "detection", [[600, 0], [610, 0], [610, 10], [600, 10], [600, 0]]),
                _feature({"name": "Tumor"}, "tile", [[700, 0], [710, 0], [710, 10], [700, 10], [700, 0]])]
    legacy = {**_feature({"name": "Tumor"}, coords=[[900, 0], [910, 0], [910, 10], [900, 10], [900, 0]]),
              "id": "PathDetectionObject"}  # QuPath 0.2 names the kind in `id`
    del legacy["properties"]["objectType"]
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps(features + [legacy]))
    with pytest.warns(UserWarning, match=r"s\.geojson: 1 cell, 2 detection, 1 tile object\(s\) left out: only "
                                         r"annotations outline lesions"):
        ann = read_annotations(path)
    assert ann.tumor.area == pytest.approx(100 * 100)


def test_qupaths_ignore_class_is_an_exclusion_and_3d_coordinates_are_read_flat(tmp_path):
    cut = [[40, 40, 0], [60, 40, 0], [60, 60, 0], [40, 60, 0], [40, 40, 0]]  # a z, as DSA's export writes
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps([_feature({"name": "Tumor"}, coords=[[x, y, 0] for x, y in SQUARE]),
                                _feature({"name": "Ignore*"}, coords=cut)]))
    ann = read_annotations(path)
    assert ann.excluded.area == pytest.approx(400) and ann.tumor.area == pytest.approx(100 * 100 - 400)
    assert ann.mask((100, 100), downsample=1).sum() == 100 * 100 - 400  # the mask of 3-D rings raised a broadcast error


def test_a_dsa_geojson_label_is_its_class():
    items = parse_geojson({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [SQUARE]},
                           "properties": {"label": {"value": "tumor"}, "lineColor": "rgb(0,0,0)"}})
    assert [name for name, _ in items] == ["tumor"]


def test_histomicstk_annotation_json_is_read():
    import math

    doc = {"annotation": {"name": "tumor", "elements": [
        {"type": "polyline", "closed": True, "points": [[0, 0, 0], [100, 0, 0], [100, 100, 0], [0, 100, 0]]},
        {"type": "polyline", "closed": False, "points": [[0, 0, 0], [50, 50, 0], [0, 90, 0]]},  # a line
        {"type": "rectangle", "center": [1000, 1000, 0], "width": 200, "height": 100, "rotation": math.pi / 2,
         "group": "metastasis"},
        {"type": "ellipse", "center": [3000, 0, 0], "width": 200, "height": 100, "rotation": 0,
         "label": {"value": "stroma"}},
        {"type": "circle", "center": [5000, 0, 0], "radius": 50},
        {"type": "point", "center": [7000, 0, 0]}]}}
    items = parse_geojson(json.dumps([doc]))
    assert [name for name, _ in items] == ["tumor", "metastasis", "stroma", "tumor"]
    assert items[1][1].bounds == pytest.approx((950, 900, 1050, 1100))  # the quarter turn about its centre
    assert items[2][1].area == pytest.approx(math.pi * 100 * 50, rel=0.01)
    assert items[3][1].area == pytest.approx(math.pi * 50 * 50, rel=0.01)


@pytest.mark.parametrize("doc, said", [
    ('[{"elements": [], "annotation": null}]', None),
    ('{"elements": [{"type": "circle", "center": [0, 0, 0], "radius": NaN}]}', "annotation 0, element 0: bad "
                                                                             "element: non-finite"),
])
def test_odd_dsa_json_is_read_or_refused_in_one_line(doc, said):
    if said is None:
        assert parse_geojson(doc) == []
    else:
        with pytest.raises(AnnotationError, match=said):
            parse_geojson(doc)


def test_asap_groups_inside_groups_take_their_parents_kind(tmp_path):
    xml = """<ASAP_Annotations><Annotations>
      <Annotation Name="a" Type="Polygon" PartOfGroup="ductal"><Coordinates>
        <Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="100" Y="0"/>
        <Coordinate Order="2" X="100" Y="100"/></Coordinates></Annotation></Annotations>
      <AnnotationGroups><Group Name="ductal" PartOfGroup="Tumor"/><Group Name="Tumor" PartOfGroup="None"/>
      </AnnotationGroups></ASAP_Annotations>"""
    path = tmp_path / "s.xml"
    path.write_text(xml)
    ann = read_annotations(path)
    assert list(ann.classes) == ["Tumor: ductal"] and ann.tumor.area == pytest.approx(5000)
    assert AnnotationClasses(tumor=("ductal",)).kind("Tumor: ductal") == "tumor"  # a part alone, when listed
    # an exclusion group inside the tumour group stays an exclusion: the innermost listed part decides
    excluded = xml.replace('PartOfGroup="ductal"><Coordinates>', 'PartOfGroup="Exclusion"><Coordinates>').replace(
        '<Group Name="ductal" PartOfGroup="Tumor"/>', '<Group Name="Exclusion" PartOfGroup="Tumor"/>')
    path.write_text(excluded)
    assert read_annotations(path).excluded.area == pytest.approx(5000)
    assert AnnotationClasses().kind("Tumor:1") == "other"  # a colon without a space is part of a name


def test_a_chain_of_groups_is_walked_once_and_bounded(tmp_path):
    """A 420 KB file chaining 10,000 groups took 30 s to parse (each annotation rebuilt its path, quadratically)
    and named a class of 68,888 characters: the walk is done once a group, and past 64 levels refused."""
    def chained(depth):
        groups = "".join(f'<Group Name="g{k}" PartOfGroup="{f"g{k - 1}" if k else "Tumor"}"/>' for k in range(depth))
        anns = "".join(f'<Annotation Name="a{j}" Type="Polygon" PartOfGroup="g{depth - 1}"><Coordinates>'
                       '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="10" Y="0"/>'
                       '<Coordinate Order="2" X="10" Y="10"/></Coordinates></Annotation>' for j in range(50))
        return (f'<ASAP_Annotations><Annotations>{anns}</Annotations><AnnotationGroups>{groups}'
                '<Group Name="Tumor" PartOfGroup="None"/></AnnotationGroups></ASAP_Annotations>')

    items = parse_asap_xml(chained(63))
    assert len(items) == 50 and items[0][0].startswith("Tumor: g0: g1: ") and items[0][0].endswith(": g62")
    with pytest.raises(AnnotationError, match=r"deep\.xml: group 'g9999' lies more than 64 groups deep"):
        parse_asap_xml(chained(10_000), source="deep.xml")


HALO = """<Annotations>
<Annotation Name="Tumor" Visible="True" LineColor="65280">
  <Regions>
    <Region Type="Polygon" HasEndcaps="0" NegativeROA="0">
      <Vertices><V X="0" Y="0"/><V X="100" Y="0"/><V X="100" Y="100"/><V X="0" Y="100"/></Vertices>
    </Region>
    <Region Type="Rectangle" HasEndcaps="0" NegativeROA="0">
      <Vertices><V X="1000" Y="1000"/><V X="1200" Y="1100"/></Vertices>
    </Region>
    <Region Type="Ruler" HasEndcaps="0" NegativeROA="0">
      <Vertices><V X="0" Y="0"/><V X="500" Y="500"/></Vertices>
    </Region>
  </Regions>
</Annotation>
</Annotations>"""


def test_halo_annotations_are_read(tmp_path):
    """HALO writes ImageScope's layout with `<V>` vertices and named region types: it read as empty."""
    path = tmp_path / "s.annotations"
    path.write_text(HALO)
    ann = read_annotations(path)
    assert ann.tumor.area == pytest.approx(100 * 100 + 200 * 100)


def test_an_imagescope_region_of_another_type_with_an_outline_is_read():
    """A QuPath-to-ImageScope script writes its class index as the region type: such outlines were dropped."""
    xml = IMAGESCOPE.replace('<Region Id="1" Type="0" NegativeROA="0"', '<Region Id="1" Type="7" NegativeROA="0"')
    items = parse_asap_xml(xml)
    assert len(items) == 4 and items[0][1].area == pytest.approx(1000 * 1000 - 200 * 200)


def _ndpa(*views: str) -> str:
    return '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<annotations>' + "".join(views) + \
        "</annotations>"


def _view(title: str, annotation: str, i: int = 1) -> str:
    return (f'<ndpviewstate id="{i}"><title>{title}</title><coordformat>nanometers</coordformat><lens>40</lens>'
            f"<x>0</x><y>0</y><z>0</z>{annotation}</ndpviewstate>")


def _freehand(points_nm, closed: int = 1, special: str = "") -> str:
    pts = "".join(f"<point><x>{x}</x><y>{y}</y></point>" for x, y in points_nm)
    return (f'<annotation type="freehand" displayname="AnnotateFreehand" color="#ff0000" {special}>'
            f"<measuretype>0</measuretype><closed>{closed}</closed><pointlist>{pts}</pointlist></annotation>")


def test_ndp_view_files_are_placed_on_their_slide_by_its_offsets():
    """NDP.view's `.ndpa` (nanometres from the glass slide's centre) was not read: a Hamamatsu user's lesions
    were "no file named like the slide". A point at the slide's own offset is its centre pixel."""
    frame = NdpaFrame(x_offset_nm=1_000_000, y_offset_nm=-50_000, mpp_x=0.25, mpp_y=0.5, width=4000, height=2000)
    # a 100 x 100 um square whose corner is the slide's centre; a circle of radius 50 um 1 mm right of it
    square = [(1_000_000, -50_000), (1_100_000, -50_000), (1_100_000, 50_000), (1_000_000, 50_000)]
    text = _ndpa(_view("Tumor", _freehand(square, special='specialtype="rectangle"')),
                 _view("metastasis", '<annotation type="circle"><x>2000000</x><y>-50000</y><radius>50000</radius>'
                                     "</annotation>", 2),
                 _view("Tumor", _freehand([(0, 0), (10, 10), (20, 0)], closed=0), 3),  # an open line: no area
                 _view("Tumor", '<annotation type="pin"><x>0</x><y>0</y></annotation>', 4))
    with pytest.warns(UserWarning, match=r"1 freehand, 1 pin annotation\(s\) left out"):
        items = parse_ndpa(text, frame, source="case.ndpi.ndpa")
    assert [name for name, _ in items] == ["Tumor", "metastasis"]
    assert items[0][1].bounds == pytest.approx((2000, 1000, 2400, 1200))  # 100 um: 400 px at 0.25, 200 at 0.5
    circle = items[1][1]
    assert circle.centroid.x == pytest.approx(2000 + 4000) and circle.centroid.y == pytest.approx(1000)
    assert circle.bounds[2] - circle.bounds[0] == pytest.approx(400) and \
        circle.bounds[3] - circle.bounds[1] == pytest.approx(200)
    ann = AnnotationSet.from_items(items)
    assert ann.tumor.area == pytest.approx(400 * 200 + circle.area)


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_an_ndpa_file_beside_its_ndpi_reads_through_either_backend(tmp_path, backend):
    ndpi = shared_file("slides", "fluorescence-dapi.ndpi")
    (tmp_path / "case.ndpi").symlink_to(ndpi)
    from wsi_vssm.io import open_slide

    with open_slide(ndpi, backend=backend) as slide:
        (w, h), mpp = slide.dimensions, slide.mpp
    # the properties of this file: the slide's centre lies 12,538,720 nm right of the glass slide's and 96,063 up
    corner = (12_538_720, -96_063)
    side = 200 * mpp * 1000  # 200 px in nm
    square = [corner, (corner[0] + side, corner[1]), (corner[0] + side, corner[1] + side),
              (corner[0], corner[1] + side)]
    path = tmp_path / "case.ndpi.ndpa"
    path.write_text(_ndpa(_view("Tumor", _freehand(square))))
    with open_slide(ndpi, backend=backend) as slide:
        ann = read_annotations(path, slide=slide)
    assert ann.tumor.bounds == pytest.approx((w / 2, h / 2, w / 2 + 200, h / 2 + 200))
    assert read_annotations(path).tumor.equals_exact(ann.tumor, 1e-6)  # the slide beside it, found by name
    path.rename(tmp_path / "moved.ndpa")
    with pytest.raises(AnnotationError, match=r"moved\.ndpa: an NDP\.view file places its outlines on its slide"):
        read_annotations(tmp_path / "moved.ndpa")
    other = shared_file("slides", "cmu-1-small-region.svs")
    with pytest.raises(AnnotationError, match=r"has no Hamamatsu slide offsets"):
        read_annotations(tmp_path / "moved.ndpa", slide=other)


def test_annotation_files_are_found_under_ndp_views_names():
    from wsi_vssm.io.annotations import annotation_file_names, annotation_key

    assert annotation_key(Path("case.NDPI.ndpa")) == "case.ndpi.ndpa" == annotation_file_names("case")[5]
    assert annotation_key(Path("Case.XML")) == "Case.xml" and annotation_key(Path("case.ndpi")) is None


def test_an_ndpa_file_whose_slide_does_not_open_is_one_line(tmp_path):
    (tmp_path / "case.ndpi").write_bytes(b"")
    (tmp_path / "case.ndpi.ndpa").write_text(_ndpa())
    with pytest.raises(AnnotationError, match=r"case\.ndpi\.ndpa: cannot open its slide to place its outlines: "
                                              r".*case\.ndpi: empty file"):
        read_annotations(tmp_path / "case.ndpi.ndpa")


def test_evaluate_finds_ndp_views_files_and_places_them_on_the_cohorts_slides(tmp_path):
    from wsi_vssm.runs.cohort_froc import read_cohort_annotations

    ndpi = shared_file("slides", "fluorescence-dapi.ndpi")
    ann = tmp_path / "ann"
    ann.mkdir()
    corner = (12_538_720, -96_063)  # the slide's centre (its offsets)
    square = [corner, (corner[0] + 50_000, corner[1]), (corner[0] + 50_000, corner[1] + 50_000),
              (corner[0], corner[1] + 50_000)]
    (ann / "case.NDPI.ndpa").write_text(_ndpa(_view("Tumor", _freehand(square))))
    found = read_cohort_annotations(ann, {"case": "case"}, {"case": 1}, paths={"case": ndpi})
    from wsi_vssm.io import open_slide

    with open_slide(ndpi) as slide:
        w, h = slide.dimensions
    assert found["case"].tumor.bounds[:2] == pytest.approx((w / 2, h / 2))


def test_a_nodes_reference_category_is_measured_from_an_ndpa_file_on_its_slide(tmp_path):
    from wsi_vssm.runs.patients import reference_categories

    ndpi = shared_file("slides", "fluorescence-dapi.ndpi")
    corner = (12_538_720, -96_063)
    square = [corner, (corner[0] + 500_000, corner[1]), (corner[0] + 500_000, corner[1] + 500_000),
              (corner[0], corner[1] + 500_000)]  # 0.5 mm a side: a micrometastasis
    (tmp_path / "case.ndpi.ndpa").write_text(_ndpa(_view("Tumor", _freehand(square))))
    from wsi_vssm.io import open_slide

    with open_slide(ndpi) as slide:
        mpp = slide.mpp
    got = reference_categories({"case": tmp_path / "case.ndpi.ndpa"}, {"case": mpp}, paths={"case": ndpi})
    assert got == {"case": "micro"}
