"""Lesion annotations in level-0 pixels, grouped into tumour, excluded and other areas, and their masks.

The files (ASAP, Aperio ImageScope and HALO XML; QuPath GeoJSON; HistomicsTK / DSA JSON; NDP.view) are read by
`io.annotation_files`, which gives every polygon a class name: its ASAP group, its ImageScope layer, or its
GeoJSON classification. Annotation names such as `_2` or `Tumor1` are labels of single polygons, not classes,
so they never decide the class when a group exists. Class names are matched case-insensitively against
`AnnotationClasses`; a derived or nested class (`Tumor: Positive`, `Tumor: ductal` for an ASAP group inside
`Tumor`) whose whole name is not listed takes the kind of its innermost part that is listed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from wsi_vssm.errors import UsageError
from wsi_vssm.io.annotation_files import (  # noqa: F401  (parsers and the error re-exported: public names)
    CLASS_PATH,
    AnnotationError,
    NdpaFrame,
    parse_asap_xml,
    parse_dsa_json,
    parse_geojson,
    parse_imagescope_xml,
    parse_ndpa,
    polygonal,
    union,
)

# CAMELYON16: groups `_0`/`_1` (or `Tumor`) are lesions and `_2` (or `Exclusion`) marks non-tumour islands
# inside them. The shared data also uses `metastasis` for lesions and `artifact`/`background` for areas to
# leave out; `tissue` and `negative` are plain (non-tumour) tissue and fall in `other`.
DEFAULT_TUMOR = ("_0", "_1", "tumor", "tumour", "metastasis", "metastases", "tumor region", "lesion",
                 # the lesion classes of predict's own contours.geojson (outputs.contours.LESION_CLASSES)
                 "tumor: itc", "tumor: micrometastasis", "tumor: macrometastasis")
# Annotation files by extension, in this order of preference when a slide has several (any case); HALO writes
# `.annotations` (XML), NDP.view `.ndpa` (XML, named after the whole slide file: `case.ndpi.ndpa`)
ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json", ".annotations", ".ndpa")
NDPA = ".ndpa"
HAMAMATSU_SUFFIXES = (".ndpi", ".vms", ".vmu")  # the slides NDP.view annotates
# `Ignore*` is QuPath's built-in class for areas to leave out
DEFAULT_EXCLUDED = ("_2", "exclusion", "excluded", "exclude", "ignore", "ignore*", "artifact", "artefact",
                    "background")


def annotation_file_names(name: str) -> list[str]:
    """The names an annotation file of the slide `name` may have (as `annotation_key` spells them), in order of
    preference: `name` with each of ANNOTATION_SUFFIXES, then NDP.view's `name.ndpi.ndpa`."""
    return [name + ext for ext in ANNOTATION_SUFFIXES] + [name + s + NDPA for s in HAMAMATSU_SUFFIXES]


def annotation_key(path: Path) -> str | None:
    """An annotation file's name with its extension(s) in lower case (`case.NDPI.ndpa` -> `case.ndpi.ndpa`), for
    `annotation_file_names`; None for a file that is no annotation file."""
    ext = path.suffix.lower()
    if ext not in ANNOTATION_SUFFIXES:
        return None
    stem = Path(path.stem)
    if ext == NDPA and stem.suffix.lower() in HAMAMATSU_SUFFIXES:
        return stem.stem + stem.suffix.lower() + ext
    return path.stem + ext


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
        """tumor, excluded or other: by the whole name, else by its parts from the innermost out (`Tumor:
        Exclusion`, an ASAP exclusion group inside a tumour group, is excluded; `Tumor: Positive` is tumour by
        `Tumor`), else by the paths of classes it lies in."""
        parts = [part.strip() for part in name.split(CLASS_PATH)]
        parents = [CLASS_PATH.join(parts[:k]) for k in range(len(parts) - 1, 1, -1)]
        tumor, excluded = {_norm(t) for t in self.tumor}, {_norm(e) for e in self.excluded}
        for candidate in [name, *(parts[::-1] if len(parts) > 1 else []), *parents]:
            n = _norm(candidate)
            if n in tumor:
                return "tumor"
            if n in excluded:
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
        unions = {name: union(gs) for name, gs in by_class.items()}
        kinds: dict[str, list[BaseGeometry]] = {"tumor": [], "excluded": [], "other": []}
        for name, geom in unions.items():
            kinds[classes.kind(name)].append(geom)
        excluded = union(kinds["excluded"])
        tumor = polygonal(union(kinds["tumor"]).difference(excluded))
        src = None if source is None else os.fspath(source)
        return cls(tumor, excluded, union(kinds["other"]), unions, src)

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
def read_annotations(path: str | os.PathLike, classes: AnnotationClasses | None = None,
                     slide=None) -> AnnotationSet:
    """Read an annotation file (chosen by extension, else by content). An NDP.view `.ndpa` file is placed on its
    slide (`ndpa_frame`): `slide`, a path or an open reader, else the file it is named after beside it
    (`case.ndpi` for `case.ndpi.ndpa`)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise AnnotationError(p, f"cannot read annotation file: {err.strerror or err}") from err
    ext = p.suffix.lower()
    if ext == NDPA:
        return AnnotationSet.from_items(parse_ndpa(data, ndpa_frame(p, slide), source=p), classes, source=p)
    if ext in (".xml", ".annotations") or (ext not in (".json", ".geojson") and data.lstrip()[:1] == b"<"):
        items = parse_asap_xml(data, source=p)
    else:
        items = parse_geojson(data, source=p)
    return AnnotationSet.from_items(items, classes, source=p)


def ndpa_frame(ndpa: Path, slide=None) -> NdpaFrame:
    """Where the NDP.view file `ndpa`'s nanometres lie: from `slide` (a path or an open `SlideReader`), else from
    the slide it is named after beside it. Its Hamamatsu offsets (OpenSlide's `XOffsetFromSlideCentre`,
    tifffile's `...Center`), um per pixel and level-0 size."""
    if slide is None:
        beside = ndpa.with_suffix("")  # case.ndpi.ndpa -> case.ndpi
        if not beside.suffix or not beside.is_file():
            raise AnnotationError(ndpa, "an NDP.view file places its outlines on its slide: keep it beside the "
                                        "slide it is named after (case.ndpi.ndpa beside case.ndpi)")
        slide = beside
    if isinstance(slide, (str, os.PathLike)):
        from wsi_vssm.io.errors import SlideError
        from wsi_vssm.io.slide import open_slide

        try:
            with open_slide(slide) as reader:
                return ndpa_frame(ndpa, reader)
        except SlideError as err:
            raise AnnotationError(ndpa, f"cannot open its slide to place its outlines: {err}") from err
    props = slide.properties
    offsets = [next((props[k] for k in (f"hamamatsu.{a}OffsetFromSlideCentre", f"hamamatsu.{a}OffsetFromSlideCenter")
                     if k in props), None) for a in "XY"]
    mpp = [props.get(f"openslide.mpp-{a}") or slide.mpp for a in "xy"]
    try:
        x_off, y_off, mpp_x, mpp_y = (float(v) for v in (*offsets, *mpp))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise AnnotationError(ndpa, f"its slide {slide.path} has no Hamamatsu slide offsets or no resolution: an "
                                    ".ndpa file belongs to an NDPI slide") from None
    if not (mpp_x > 0 and mpp_y > 0 and math.isfinite(x_off) and math.isfinite(y_off)):
        raise AnnotationError(ndpa, f"its slide {slide.path} has an unusable resolution or offset")
    return NdpaFrame(x_off, y_off, mpp_x, mpp_y, *slide.dimensions)


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

