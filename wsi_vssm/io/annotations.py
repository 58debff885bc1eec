"""Lesion annotations: ASAP XML (CAMELYON16), Aperio ImageScope XML and GeoJSON (QuPath) polygons in level-0
pixels, and their masks.

Every polygon gets a class name: its ASAP group (`PartOfGroup`; the annotation's own name only when the group
is `None`), its ImageScope layer's name (else the region's text; a negative region is `exclusion`), or its
GeoJSON classification (QuPath's `classification.name`, else a `classification`, `class`,
`label` or `group` property; `name` only when none of those exists). Annotation names such as `_2` or
`Tumor1` are labels of single polygons, not classes, so they never decide the class when a group exists.
Class names are matched case-insensitively against `AnnotationClasses` to form the tumour, excluded and other
geometries.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.errors import GEOSException
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry

from wsi_vssm.errors import UsageError, WsiVssmError, one_line

# CAMELYON16: groups `_0`/`_1` (or `Tumor`) are lesions and `_2` (or `Exclusion`) marks non-tumour islands
# inside them. The shared data also uses `metastasis` for lesions and `artifact`/`background` for areas to
# leave out; `tissue` and `negative` are plain (non-tumour) tissue and fall in `other`.
DEFAULT_TUMOR = ("_0", "_1", "tumor", "tumour", "metastasis", "metastases", "tumor region", "lesion",
                 # the lesion classes of predict's own contours.geojson (outputs.contours.LESION_CLASSES)
                 "tumor: itc", "tumor: micrometastasis", "tumor: macrometastasis")
# Annotation files by extension, in this order of preference when a slide has several (any case).
ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")
DEFAULT_EXCLUDED = ("_2", "exclusion", "excluded", "exclude", "ignore", "artifact", "artefact", "background")

_PARSE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, GEOSException)


class AnnotationError(WsiVssmError):
    """An annotation file could not be read or parsed. `str()` is one line: '<path>: <problem>'."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


@dataclass(frozen=True)
class AnnotationClasses:
    """Which class names (case-insensitive) are tumour and which are excluded; every other name is `other`."""

    tumor: tuple[str, ...] = DEFAULT_TUMOR
    excluded: tuple[str, ...] = DEFAULT_EXCLUDED

    def __post_init__(self):
        both = {_norm(n) for n in self.tumor} & {_norm(n) for n in self.excluded}
        if both:
            raise UsageError(f"annotation class names both tumour and excluded: {sorted(both)}")

    def kind(self, name: str) -> str:
        n = _norm(name)
        if n in {_norm(t) for t in self.tumor}:
            return "tumor"
        if n in {_norm(e) for e in self.excluded}:
            return "excluded"
        return "other"


@dataclass
class AnnotationSet:
    """Polygons in level-0 pixels: unions per kind, and per raw class name in `classes`.

    `tumor` is the union of tumour polygons with the excluded ones already cut out; `excluded` and `other`
    are plain unions. All are (possibly empty) shapely geometries.
    """

    tumor: BaseGeometry
    excluded: BaseGeometry
    other: BaseGeometry
    classes: dict[str, BaseGeometry] = field(default_factory=dict)
    source: str | None = None

    @classmethod
    def from_items(
        cls, items: Iterable[tuple[str, BaseGeometry]], classes: AnnotationClasses | None = None, source=None
    ) -> AnnotationSet:
        classes = classes or AnnotationClasses()
        by_class: dict[str, list[BaseGeometry]] = {}
        for name, geom in items:
            by_class.setdefault(name, []).append(geom)
        unions = {name: _union(gs) for name, gs in by_class.items()}
        kinds: dict[str, list[BaseGeometry]] = {"tumor": [], "excluded": [], "other": []}
        for name, geom in unions.items():
            kinds[classes.kind(name)].append(geom)
        excluded = _union(kinds["excluded"])
        tumor = _polygonal(_union(kinds["tumor"]).difference(excluded))
        src = None if source is None else os.fspath(source)
        return cls(tumor, excluded, _union(kinds["other"]), unions, src)

    def geometry(self, which: str) -> BaseGeometry:
        if which in ("tumor", "excluded", "other"):
            return getattr(self, which)
        if which in self.classes:
            return self.classes[which]
        valid = ["tumor", "excluded", "other", *sorted(self.classes)]
        raise UsageError(f"unknown annotation class {which!r}; valid: {valid}")

    def mask(
        self,
        shape_or_box: tuple[int, int] | tuple[float, float, float, float],
        downsample: float | None = None,
        *,
        mpp: float | None = None,
        slide_mpp: float | None = None,
        which: str = "tumor",
    ) -> np.ndarray:
        """Rasterise `which` (tumor, excluded, other or a class name) to a bool mask; holes stay holes.

        `shape_or_box` is the mask's (height, width), starting at level-0 (0, 0), or a level-0 box
        (x, y, w, h). The scale is `downsample` (level-0 pixels per mask pixel) or `mpp` with `slide_mpp`.
        A mask pixel is set when its centre lies inside the geometry.
        """
        d = _downsample(downsample, mpp, slide_mpp)
        if len(shape_or_box) == 2:
            h, w = (int(v) for v in shape_or_box)
            x0 = y0 = 0.0
        elif len(shape_or_box) == 4:
            x0, y0, bw, bh = (float(v) for v in shape_or_box)
            w, h = max(1, round(bw / d)), max(1, round(bh / d))
        else:
            raise UsageError(f"mask needs (height, width) or a box (x, y, w, h), got {shape_or_box!r}")
        if h <= 0 or w <= 0:
            raise UsageError(f"mask size must be positive, got {h}x{w}")
        return rasterize(self.geometry(which), (h, w), origin=(x0, y0), downsample=d)

    def __repr__(self) -> str:
        return (
            f"<AnnotationSet {self.source or ''} tumor={self.tumor.area:.0f}px2 excluded="
            f"{self.excluded.area:.0f}px2 other={self.other.area:.0f}px2 classes={sorted(self.classes)}>"
        )


# ---- reading -----------------------------------------------------------------------------------------------
def read_annotations(path: str | os.PathLike, classes: AnnotationClasses | None = None) -> AnnotationSet:
    """Read an ASAP XML or GeoJSON file (chosen by extension, else by content)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise AnnotationError(p, f"cannot read annotation file: {err.strerror or err}") from err
    ext = p.suffix.lower()
    if ext == ".xml" or (ext not in (".json", ".geojson") and data.lstrip()[:1] == b"<"):
        items = parse_asap_xml(data, source=p)
    else:
        items = parse_geojson(data, source=p)
    return AnnotationSet.from_items(items, classes, source=p)


def parse_asap_xml(data: bytes | str, source=None) -> list[tuple[str, BaseGeometry]]:
    """(class name, polygon) pairs from ASAP XML, or Aperio ImageScope XML (`parse_imagescope_xml`). Dots, point
    sets and lines (no area) are skipped."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise AnnotationError(source, f"not valid XML: {err}") from err
    if root.tag == "Annotations":
        return parse_imagescope_xml(root, source)
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(source, f"not an ASAP or Aperio ImageScope annotation file (root element "
                                      f"<{root.tag}>)")
    items = []
    for i, ann in enumerate(root.iter("Annotation")):
        kind = (ann.get("Type") or "Polygon").strip().lower()
        if kind not in ("polygon", "spline", "rectangle"):
            continue
        group = (ann.get("PartOfGroup") or "").strip()
        name = group if group and group.lower() != "none" else (ann.get("Name") or "").strip()
        try:
            pts = sorted(
                (float(c.get("Order", j)), float(c.get("X")), float(c.get("Y")))  # type: ignore[arg-type]
                for j, c in enumerate(ann.iter("Coordinate"))
            )
            geom = _polygon([(x, y) for _, x, y in pts], source, f"annotation {i} ({ann.get('Name')!r})")
        except _PARSE_ERRORS as err:
            raise AnnotationError(
                source, f"annotation {i} ({ann.get('Name')!r}): bad coordinates: {err}"
            ) from err
        if geom is not None:
            items.append((name, geom))
    return items


IMAGESCOPE_AREAS = {"0": "polygon", "1": "rectangle", "2": "ellipse"}  # Region Type; arrows, rulers, pins: none


def parse_imagescope_xml(data: bytes | str | ET.Element, source=None) -> list[tuple[str, BaseGeometry]]:
    """(class name, polygon) pairs from Aperio ImageScope XML (`<Annotations><Annotation><Regions><Region>
    <Vertices><Vertex X Y>`, level-0 pixels): free-hand and polygon regions, rectangles and ellipses (the
    corners of their bounding box). A region's class is its layer's (`_imagescope_layer_class`), else its own
    `Text`; a negative region (`NegativeROA="1"`) is cut out of its layer's other regions."""
    try:
        root = data if isinstance(data, ET.Element) else ET.fromstring(data)
    except ET.ParseError as err:
        raise AnnotationError(source, f"not valid XML: {err}") from err
    items = []
    for i, layer in enumerate(root.iter("Annotation")):
        layer_class = _imagescope_layer_class(layer)
        regions, negative = [], []
        for j, region in enumerate(layer.iter("Region")):
            shape_kind = IMAGESCOPE_AREAS.get((region.get("Type") or "0").strip())
            if shape_kind is None:
                continue
            what = f"annotation {i}, region {region.get('Id', j)}"
            try:
                pts = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]  # type: ignore[arg-type]
                geom = _ellipse(pts, source, what) if shape_kind == "ellipse" else _polygon(pts, source, what)
            except _PARSE_ERRORS as err:
                raise AnnotationError(source, f"{what}: bad vertices: {err}") from err
            if geom is None:
                continue
            if (region.get("NegativeROA") or "0").strip() == "1":
                negative.append(geom)
            else:
                regions.append((layer_class or (region.get("Text") or "").strip(), geom))
        hole = _union(negative)
        for name, geom in regions:
            kept = _polygonal(geom.difference(hole)) if negative else geom
            if not kept.is_empty:
                items.append((name, kept))
    return items


def _imagescope_layer_class(layer: ET.Element) -> str:
    """A layer's class: its `Name`, else its first attribute's value (ImageScope's default attribute is an
    empty `Description`), else that attribute's own name when it is not `Description` (`<Attribute
    Name="Tumor" Value=""/>`, as TCGA's annotations have it)."""
    name = (layer.get("Name") or "").strip()
    if name:
        return name
    attribute = layer.find("Attributes/Attribute")
    if attribute is None:
        return ""
    value, key = (attribute.get("Value") or "").strip(), (attribute.get("Name") or "").strip()
    return value or ("" if key.lower() == "description" else key)


def _ellipse(pts: list[tuple[float, float]], source, what: str) -> BaseGeometry | None:
    from shapely import affinity
    from shapely.geometry import Point

    if not all(math.isfinite(v) for p in pts for v in p):
        raise AnnotationError(source, f"{what}: non-finite coordinate")
    if len(pts) < 2:
        return None
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    rx, ry = (max(xs) - min(xs)) / 2, (max(ys) - min(ys)) / 2
    if rx <= 0 or ry <= 0:
        return None
    circle = Point((max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2).buffer(1.0, quad_segs=16)
    return affinity.scale(circle, rx, ry)


def parse_geojson(data: bytes | str | dict | list, source=None) -> list[tuple[str, BaseGeometry]]:
    """(class name, polygon) pairs from a FeatureCollection, a Feature, a geometry, or a list of those."""
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError) as err:
            raise AnnotationError(source, f"not valid JSON: {one_line(err)}") from err
    items: list[tuple[str, BaseGeometry]] = []
    try:
        _collect(data, "", items, source, depth=0)
    except AnnotationError:
        raise
    except _PARSE_ERRORS as err:
        raise AnnotationError(source, f"bad GeoJSON: {one_line(err)}") from err
    return items


def _collect(obj, name: str, items: list, source, depth: int) -> None:
    if depth > 8:
        raise AnnotationError(source, "GeoJSON nested too deeply")
    if isinstance(obj, list):
        for o in obj:
            _collect(o, name, items, source, depth + 1)
        return
    if not isinstance(obj, dict):
        raise AnnotationError(source, f"expected a GeoJSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind == "FeatureCollection":
        _collect(_field(obj, "features", list, source), name, items, source, depth + 1)
    elif kind == "Feature":
        geom = obj.get("geometry")
        if geom is not None:
            _collect(geom, _feature_class(obj.get("properties"), obj.get("name")), items, source, depth + 1)
    elif kind == "GeometryCollection":
        _collect(_field(obj, "geometries", list, source), name, items, source, depth + 1)
    elif kind in ("Polygon", "MultiPolygon"):
        geom = _valid(shape(obj), source, kind)
        if geom is not None:
            items.append((name, geom))
    elif kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        return  # no area
    else:
        raise AnnotationError(source, f"unknown GeoJSON type {kind!r}")


def _feature_class(props, fallback) -> str:
    """QuPath: properties.classification.name; else a classification/class/label/group property; else name."""
    if not isinstance(props, dict):
        props = {}
    cls = props.get("classification")
    if isinstance(cls, dict):
        cls = cls.get("name")
    for value in (
        cls,
        props.get("class"),
        props.get("label"),
        props.get("group"),
        props.get("name"),
        fallback,
    ):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _field(obj: dict, key: str, typ: type, source):
    value = obj.get(key)
    if not isinstance(value, typ):
        raise AnnotationError(source, f"GeoJSON {obj.get('type')} needs a {typ.__name__} {key!r}")
    return value


# ---- geometry ----------------------------------------------------------------------------------------------
def _polygon(pts: list[tuple[float, float]], source, what: str) -> BaseGeometry | None:
    if not all(math.isfinite(v) for p in pts for v in p):
        raise AnnotationError(source, f"{what}: non-finite coordinate")
    if len(pts) < 3:
        return None  # a dot or a line: no area to rasterise
    return _valid(Polygon(pts), source, what)


def _valid(geom: BaseGeometry, source, what: str) -> BaseGeometry | None:
    """Polygonal, valid geometry (hand-drawn outlines often cross themselves), or None when it has no area."""
    coords = shapely.get_coordinates(geom)
    if coords.size and not np.isfinite(coords).all():
        raise AnnotationError(source, f"{what}: non-finite coordinate")
    if not geom.is_valid:
        # "structure": the area the rings enclose, in time about linear in the crossings; the default "linework"
        # took 103 s (and no Ctrl-C) for a 29 KB outline of 600 crossing vertices. On the real CAMELYON16
        # outlines that cross themselves (8 of tumor_009/076/085's) the two agree within 0.002% of the area
        # (bench/annotation_repair.py).
        geom = shapely.make_valid(geom, method="structure", keep_collapsed=False)
    geom = _polygonal(geom)
    return None if geom.is_empty or geom.area <= 0 else geom


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [g for g in getattr(geom, "geoms", ()) if isinstance(g, (Polygon, MultiPolygon))]
    return _union(parts) if parts else MultiPolygon()


def _union(geoms: list[BaseGeometry]) -> BaseGeometry:
    if not geoms:
        return MultiPolygon()
    return _polygonal(shapely.union_all(geoms))


def rasterize(
    geom: BaseGeometry, shape_hw: tuple[int, int], origin: tuple[float, float] = (0.0, 0.0), downsample=1.0
) -> np.ndarray:
    """A bool (h, w) mask of `geom` (level-0 px) on a grid starting at `origin` with `downsample` px/pixel.

    Pixel (i, j) is set when its centre, level-0 (ox + (j + 0.5) d, oy + (i + 0.5) d), lies inside. A scanline
    fill with the even-odd rule over all rings, so holes and islands inside holes come out right and adjacent
    polygons neither overlap nor leave gaps.
    """
    h, w = shape_hw
    polys = [geom] if isinstance(geom, Polygon) else list(getattr(geom, "geoms", ()))
    rings = [r for p in polys if isinstance(p, Polygon) for r in (p.exterior, *p.interiors)]
    if not rings or h <= 0 or w <= 0:
        return np.zeros((max(h, 0), max(w, 0)), dtype=bool)
    ox, oy = origin
    rows_all, cols_all = [], []
    for ring in rings:
        xy = (np.asarray(ring.coords, dtype=np.float64) - (ox, oy)) / downsample
        x0, y0, x1, y1 = xy[:-1, 0], xy[:-1, 1], xy[1:, 0], xy[1:, 1]
        lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
        # Rows whose centre line r + 0.5 crosses the edge, half-open [lo, hi) so a shared vertex counts once.
        r0 = np.clip(np.ceil(lo - 0.5), 0, h).astype(np.int64)
        r1 = np.clip(np.ceil(hi - 0.5), 0, h).astype(np.int64)
        n = np.maximum(r1 - r0, 0)
        if not n.any():
            continue
        edge = np.repeat(np.arange(n.size), n)
        rows = r0[edge] + (np.arange(edge.size) - np.repeat(np.cumsum(n) - n, n))
        t = (rows + 0.5 - y0[edge]) / (y1[edge] - y0[edge])
        xs = x0[edge] + t * (x1[edge] - x0[edge])
        rows_all.append(rows)
        cols_all.append(
            np.clip(np.ceil(xs - 0.5), 0, w).astype(np.int64)
        )  # first pixel right of the crossing
    flips = np.zeros((h, w + 1), dtype=np.uint8)
    if rows_all:
        np.bitwise_xor.at(flips, (np.concatenate(rows_all), np.concatenate(cols_all)), 1)
    return np.bitwise_xor.accumulate(flips, axis=1)[:, :w].astype(bool)


def _downsample(downsample: float | None, mpp: float | None, slide_mpp: float | None) -> float:
    if downsample is None:
        if mpp is None or slide_mpp is None:
            raise UsageError("mask needs `downsample`, or `mpp` together with the slide's `slide_mpp`")
        downsample = mpp / slide_mpp
    if not (math.isfinite(downsample) and downsample > 0):
        raise UsageError(f"downsample must be a positive number, got {downsample!r}")
    return float(downsample)


def _norm(name: str) -> str:
    return " ".join(str(name).split()).lower()

