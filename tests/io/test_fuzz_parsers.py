"""Property-based fuzzing of the parsers that read user files: ASAP XML, GeoJSON, contours.geojson read back, and
cohort manifests.

Whatever the bytes, each parser returns a result or raises its own one-line error (a WsiVssmError naming the
file); never another exception, never a multi-line message.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsi_vssm.errors import UsageError, WsiVssmError
from wsi_vssm.io.annotations import AnnotationError, parse_asap_xml, parse_geojson
from wsi_vssm.outputs.contours import read_contours_geojson
from wsi_vssm.runs.cohort import read_cohort

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6),
                    st.text(max_size=4))


def _one_line(err: Exception) -> None:
    assert "\n" not in str(err) and str(err)


@st.composite
def asap_docs(draw) -> str:
    """Mostly well-formed ASAP XML with odd values, sometimes cut short or with a foreign root."""
    anns = []
    for i in range(draw(st.integers(0, 3))):
        coords = "".join(f'<Coordinate Order="{draw(numbers)}" X="{draw(numbers)}" Y="{draw(numbers)}"/>'
                         for _ in range(draw(st.integers(0, 5))))
        kind = draw(st.sampled_from(["Polygon", "Spline", "Dot", "Rectangle", "", "PointSet"]))
        group = draw(st.sampled_from(["_0", "_2", "Tumor", "None", "", "x"]))
        anns.append(f'<Annotation Name="a{i}" Type="{kind}" PartOfGroup="{group}"><Coordinates>{coords}'
                    f"</Coordinates></Annotation>")
    root = draw(st.sampled_from(["ASAP_Annotations", "Other"]))
    doc = f"<{root}><Annotations>{''.join(anns)}</Annotations></{root}>"
    return doc[: draw(st.integers(0, len(doc)))] if draw(st.booleans()) else doc


@FUZZ
@given(st.one_of(asap_docs(), st.text(max_size=300), st.binary(max_size=300)))
def test_asap_xml_parser_never_crashes(data):
    try:
        items = parse_asap_xml(data, source="fuzz.xml")
    except AnnotationError as err:
        _one_line(err)
        assert "fuzz.xml" in str(err)
        return
    assert all(isinstance(name, str) and geom.is_valid for name, geom in items)


GEOJSON_TYPES = ["Polygon", "MultiPolygon", "Feature", "FeatureCollection", "Point"]
GEOJSON_KEYS = ["type", "coordinates", "features", "geometry", "properties", "name"]


def geojson_like(leaves, keys: list[str], max_size: int, max_leaves: int):
    """Nested JSON values of `leaves`, GeoJSON type names, and lists and objects keyed by `keys`."""
    return st.recursive(
        st.one_of(st.none(), st.booleans(), leaves, st.sampled_from(GEOJSON_TYPES)),
        lambda inner: st.one_of(st.lists(inner, max_size=max_size),
                                st.dictionaries(st.sampled_from(keys), inner, max_size=4)),
        max_leaves=max_leaves,
    )


json_values = geojson_like(numbers, GEOJSON_KEYS + ["classification"], max_size=4, max_leaves=25)


@FUZZ
@given(st.one_of(json_values, st.text(max_size=200)))
def test_geojson_parser_never_crashes(obj):
    data = obj if isinstance(obj, str) else json.dumps(obj, allow_nan=True)
    try:
        items = parse_geojson(data, source="fuzz.geojson")
    except AnnotationError as err:
        _one_line(err)
        return
    assert all(isinstance(name, str) and geom.is_valid for name, geom in items)


contour_values = geojson_like(st.one_of(numbers, st.integers(10**300, 10**310)),
                              GEOJSON_KEYS + ["measurements", "Max probability", "Area um^2", "lesion_id"],
                              max_size=5, max_leaves=30)


@FUZZ
@given(st.one_of(contour_values, st.text(max_size=200)))
def test_contours_reader_never_crashes(obj):
    """The napari plugin's contours layer reads contours.geojson files that other tools may have written."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "contours.geojson"
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj, allow_nan=True))
        try:
            feats = read_contours_geojson(path)
        except UsageError as err:
            _one_line(err)
            assert str(err).startswith(f"{path}: ")
            return
    for f in feats:
        assert isinstance(f.name, str) and isinstance(f.max_probability, float)
        assert all(r.ndim == 2 and r.shape[1] == 2 and len(r) >= 3 and np.isfinite(r).all() for r in f.rings)
        assert all(isinstance(v, (int, float)) for v in f.properties["measurements"].values() if v is not None)


cells = st.one_of(st.sampled_from(["slide", "label", "split", "0", "1", "tumor", "Normal", "train", "x.svs", "",
                                   "a b.tif", '"q,uote"', "#c"]), st.text(max_size=8))


@FUZZ
@given(st.lists(st.lists(cells, min_size=0, max_size=4), max_size=6), st.booleans())
def test_manifest_reader_never_crashes(rows, binary):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.csv"
        text = "\n".join(",".join(r) for r in rows)
        path.write_bytes(text.encode("utf-8") if not binary else b"\xff\xfe" + text.encode("utf-16-le"))
        try:
            cohort = read_cohort(path)
        except WsiVssmError as err:
            _one_line(err)
            assert "m.csv" in str(err)
            return
        assert all(r.label in (0, 1) and (r.ok or r.error) for r in cohort.rows)
