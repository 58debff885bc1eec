"""Tumour contours from the heatmap, and their GeoJSON in the form QuPath imports.

A contour is the exact outline of a 4-connected group of cells at or above the threshold (the union of their
boxes under the grid convention of `wsi_vssm.outputs.heatmap`), in level-0 pixels, holes included. Cells that
touch only at a corner give separate polygons. Collinear vertices along cell edges are dropped.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import MultiPolygon, Polygon, box, mapping

from wsi_vssm.atomic import atomic_write_json
from wsi_vssm.errors import UsageError, is_real_number, one_line
from wsi_vssm.outputs.heatmap import _grid, _pair, _positive

TUMOR_CLASS = {"name": "Tumor", "color": [200, 0, 0]}
# QuPath classes of lesion categories (outputs.lesions): the contours of a slide show as ITC / micro / macro
LESION_CLASSES = {
    "itc": {"name": "Tumor: ITC", "color": [255, 200, 0]},
    "micro": {"name": "Tumor: micrometastasis", "color": [255, 110, 0]},
    "macro": {"name": "Tumor: macrometastasis", "color": [200, 0, 0]},
}
_4_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])
_ID_NAMESPACE = uuid.UUID("7b0f8a52-3f6e-4c8e-9a51-2f3b0c1d9e10")  # stable feature ids across reruns
OUT_OF_DOMAIN_SUFFIX = " - OUT OF DOMAIN"  # on each outline's name when the slide is out of the model's domain


def tumour_contours(
    prob: np.ndarray, threshold: float, cell0: float, origin: tuple[float, float], min_area_cells: float = 1
) -> list[Polygon]:
    """Polygons (level-0 px) outlining cells with `prob >= threshold`; NaN cells never count.

    Groups smaller than `min_area_cells` cells are dropped. Polygons come largest first.
    """
    prob = _grid(prob)
    cell0 = _positive(cell0, "cell0")
    x0, y0 = _pair(origin, "origin")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise UsageError(f"threshold must be a number, got {threshold!r}")
    hot = np.nan_to_num(prob, nan=-np.inf) >= threshold
    labels, n = ndi.label(hot, structure=_4_CONNECTED)
    polys: list[Polygon] = []
    for k, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = labels[sl] == k
        if mask.sum() < min_area_cells:
            continue
        boxes = [
            box(
                x0 + (sl[1].start + c0) * cell0,
                y0 + (sl[0].start + r) * cell0,
                x0 + (sl[1].start + c1) * cell0,
                y0 + (sl[0].start + r + 1) * cell0,
            )
            for r, row in enumerate(mask)
            for c0, c1 in _runs(row)
        ]  # one box per horizontal run: far fewer pieces to union than one per cell
        geom = shapely.simplify(shapely.union_all(boxes), 0.0)  # tolerance 0 drops collinear vertices only
        polys.extend(_parts(geom))
    polys.sort(key=lambda p: -p.area)
    return polys


def group_by_lesion(polygons: list[Polygon], lesion_ids: list[int]) -> tuple[list, list[int]]:
    """One geometry per lesion (a MultiPolygon when the lesion is several pieces), in lesion-id order, and the
    ids; pieces under no lesion (id 0) stay one each, after them. So that QuPath counts and measures a lesion as
    lesions.csv does, not piece by piece."""
    if len(lesion_ids) != len(polygons):
        raise UsageError(f"{len(lesion_ids)} lesion ids for {len(polygons)} contours")
    pieces: dict[int, list[Polygon]] = {}
    for poly, i in zip(polygons, lesion_ids, strict=True):
        pieces.setdefault(int(i), []).append(poly)
    ids = sorted(i for i in pieces if i)
    geoms = [pieces[i][0] if len(pieces[i]) == 1 else MultiPolygon(pieces[i]) for i in ids]
    return geoms + pieces.get(0, []), ids + [0] * len(pieces.get(0, []))


def max_probability(
    polygons: list[Polygon], prob: np.ndarray, cell0: float, origin: tuple[float, float]
) -> list[float | None]:
    """The highest cell probability inside each polygon (cells whose centre it contains); None if none."""
    from wsi_vssm.io.annotations import rasterize

    prob = _grid(prob)
    cell0 = _positive(cell0, "cell0")
    x0, y0 = _pair(origin, "origin")
    out: list[float | None] = []
    for poly in polygons:
        minx, miny, maxx, maxy = poly.bounds
        c0, r0 = max(0, math.floor((minx - x0) / cell0)), max(0, math.floor((miny - y0) / cell0))
        c1 = min(prob.shape[1], math.ceil((maxx - x0) / cell0))
        r1 = min(prob.shape[0], math.ceil((maxy - y0) / cell0))
        if c1 <= c0 or r1 <= r0:
            out.append(None)
            continue
        inside = rasterize(poly, (r1 - r0, c1 - c0), origin=(x0 + c0 * cell0, y0 + r0 * cell0), downsample=cell0)
        vals = prob[r0:r1, c0:c1][inside]
        vals = vals[np.isfinite(vals)]
        out.append(float(vals.max()) if vals.size else None)
    return out


def contours_geojson(
    polygons: list[Polygon],
    max_probabilities: list[float | None] | None = None,
    slide_mpp: float | None = None,
    slide: str = "",
    lesions: list[tuple[int, str]] | None = None,
    in_domain: bool | None = None,
) -> dict:
    """A QuPath-importable FeatureCollection: one "Tumor" annotation per polygon, coordinates in level-0 px.

    Each feature carries `properties.objectType = "annotation"`, `classification {name, color}`, a `name`,
    and `measurements` (QuPath's dict form): "Max probability" when given, "Area um^2" when `slide_mpp` is.
    `lesions`, one (lesion id, category) per polygon (`outputs.lesions`), makes the class the lesion's category
    (`LESION_CLASSES`), names the feature after its lesion and adds `lesion_id` and `category` properties.
    `in_domain` (the slide's verdict, prediction.json's) is added as a property of every feature; when False the
    name ends in " - OUT OF DOMAIN", so that QuPath's annotation list says it beside every outline.
    """
    if max_probabilities is not None and len(max_probabilities) != len(polygons):
        raise UsageError(f"{len(max_probabilities)} probabilities for {len(polygons)} contours")
    if lesions is not None and len(lesions) != len(polygons):
        raise UsageError(f"{len(lesions)} lesion ids for {len(polygons)} contours")
    features = []
    for i, poly in enumerate(polygons):
        if not isinstance(poly, (Polygon, MultiPolygon)) or poly.is_empty:
            raise UsageError(f"contour {i} is not a non-empty polygon: {type(poly).__name__}")
        measurements = {}
        if max_probabilities is not None and max_probabilities[i] is not None:
            measurements["Max probability"] = float(max_probabilities[i])
        if slide_mpp is not None:
            measurements["Area um^2"] = float(poly.area * _positive(slide_mpp, "slide mpp") ** 2)
        props = {"objectType": "annotation", "classification": dict(TUMOR_CLASS), "name": f"Tumor {i + 1}",
                 "isLocked": False, "measurements": measurements}
        if lesions is not None and lesions[i][0]:
            lesion_id, category = lesions[i]
            props.update(classification=dict(LESION_CLASSES.get(category, TUMOR_CLASS)), lesion_id=int(lesion_id),
                         category=category, name=f"Lesion {lesion_id} ({category})")
        if in_domain is not None:
            props["in_domain"] = bool(in_domain)
            if not in_domain:
                props["name"] += OUT_OF_DOMAIN_SUFFIX
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_ID_NAMESPACE, f"{slide}/{i}/{poly.bounds}/{poly.area}")),
                "geometry": mapping(shapely.normalize(poly).reverse()),  # exterior counter-clockwise (RFC 7946)
                "properties": props,
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_contours_geojson(
    path: str | os.PathLike,
    polygons: list[Polygon],
    max_probabilities: list[float | None] | None = None,
    slide_mpp: float | None = None,
    slide: str = "",
    lesions: list[tuple[int, str]] | None = None,
    in_domain: bool | None = None,
) -> None:
    """Write `contours_geojson(...)` to `path` atomically (an empty FeatureCollection when there are none)."""
    atomic_write_json(path, contours_geojson(polygons, max_probabilities, slide_mpp, slide, lesions, in_domain))


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [start, end) column runs of True in a 1-D bool array."""
    d = np.diff(np.concatenate(([0], row.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True))


def _parts(geom) -> list[Polygon]:
    if isinstance(geom, Polygon):
        return [] if geom.is_empty else [geom]
    return [g for g in getattr(geom, "geoms", ()) if isinstance(g, Polygon) and not g.is_empty]


@dataclass
class ContourFeature:
    """One feature of a contours.geojson as read back: its rings in level-0 px (x, y), exterior and holes."""

    name: str
    rings: list[np.ndarray] = field(default_factory=list)  # each (n, 2) float, closing point dropped
    max_probability: float = math.nan
    properties: dict = field(default_factory=dict)  # its "measurements" always a dict of numbers (or None)


def read_contours_geojson(path: str | os.PathLike) -> list[ContourFeature]:
    """The features of a contours.geojson (ours or any GeoJSON of polygons): a FeatureCollection, a bare array
    of Features (as some tools write) or one Feature. Anything malformed is a UsageError, one line naming the file
    and, where it helps, the feature."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: not UTF-8 or not JSON
        raise UsageError(f"{path}: not a contours GeoJSON: {type(err).__name__}: {one_line(err)}") from err
    if isinstance(doc, list):
        features = doc
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, dict) and isinstance(doc.get("features"), list):
        features = doc["features"]
    elif isinstance(doc, dict):
        got = f"'features' is {_show(doc['features'])}, not an array" if "features" in doc else \
            "an object with no 'features' array, nor a Feature"
        raise UsageError(f"{path}: not a contours GeoJSON: {got}")
    else:
        raise UsageError(f"{path}: not a contours GeoJSON: {_show(doc)} is not a FeatureCollection, a Feature or "
                         "an array of Features")
    return [_feature(feat, f"{path}: feature {i}", i) for i, feat in enumerate(features)]


def _feature(feat, where: str, i: int) -> ContourFeature:
    if not (isinstance(feat, dict) and feat.get("type") == "Feature"):
        raise UsageError(f"{where} is {_show(feat)}, not a GeoJSON Feature object")
    props = {} if feat.get("properties") is None else feat["properties"]
    if not isinstance(props, dict):
        raise UsageError(f"{where}: properties is {_show(props)}, not an object")
    props = dict(props)
    measurements = {} if props.get("measurements") is None else props["measurements"]
    if isinstance(measurements, list) and all(isinstance(m, dict) and isinstance(m.get("name"), str)
                                              for m in measurements):  # QuPath before 0.4: [{name, value}]
        measurements = {m["name"]: m.get("value") for m in measurements}
    if not isinstance(measurements, dict):
        raise UsageError(f"{where}: measurements is {_show(measurements)}, not an object")
    for key, value in measurements.items():  # readers (the napari layer) take them as floats
        if value is not None and _float(value) is None:
            raise UsageError(f"{where}: measurement {key!r} is {_show(value)}, not a number")
    props["measurements"] = measurements
    lesion = props.get("lesion_id")
    if lesion is not None and not (isinstance(lesion, int) and not isinstance(lesion, bool)):
        raise UsageError(f"{where}: lesion_id is {_show(lesion)}, not a whole number")
    prob = measurements.get("Max probability")
    return ContourFeature(str(props.get("name") or f"Tumor {i + 1}"), _rings(feat.get("geometry"), where),
                          math.nan if prob is None else _float(prob), props)


_NO_AREA = ("Point", "MultiPoint", "LineString", "MultiLineString", "GeometryCollection")  # valid, but no rings


def _rings(geometry, where: str) -> list[np.ndarray]:
    """Every ring (exterior and holes) of a GeoJSON Polygon or MultiPolygon, as (n, 2) arrays, closing point off;
    none for a null geometry or one without area."""
    if geometry is None:
        return []
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    if kind in _NO_AREA:
        return []
    if kind not in ("Polygon", "MultiPolygon"):
        raise UsageError(f"{where}: geometry is {_show(geometry)}, not a GeoJSON geometry")
    coords = geometry.get("coordinates")
    polygons = [coords] if kind == "Polygon" else coords
    if not isinstance(polygons, list) or not all(isinstance(p, list) for p in polygons):
        raise UsageError(f"{where}: {kind} coordinates are {_show(coords)}, not lists of rings")
    return [_ring(ring, f"{where}: ring {j}" if kind == "Polygon" else f"{where}: polygon {k}, ring {j}")
            for k, poly in enumerate(polygons) for j, ring in enumerate(poly)]


def _ring(ring, where: str) -> np.ndarray:
    if not isinstance(ring, list):
        raise UsageError(f"{where} is {_show(ring)}, not an array of [x, y] positions")
    xy = []
    for k, pos in enumerate(ring):
        x, y = (_float(v) for v in pos[:2]) if isinstance(pos, list) and len(pos) >= 2 else (None, None)
        if x is None or y is None or not math.isfinite(x) or not math.isfinite(y):
            raise UsageError(f"{where}, position {k} is {_show(pos)}, not [x, y] finite numbers")
        xy.append((x, y))
    a = np.array(xy, dtype=float).reshape(-1, 2)
    a = a[:-1] if len(a) > 1 and np.array_equal(a[0], a[-1]) else a
    if len(a) < 3:
        raise UsageError(f"{where} has {len(a)} corner(s) (closing position not counted); a ring needs 3")
    return a


def _float(value) -> float | None:
    """A JSON number as a float; None for anything else (a string, a boolean, an integer too large)."""
    try:
        return float(value) if is_real_number(value) else None
    except OverflowError:
        return None


def _show(value) -> str:
    """A JSON value as a one-line message shows it: its JSON text, cut short."""
    return one_line(json.dumps(value, allow_nan=True), 60)
