"""Lesions: connected groups of hot cells in a cell-probability grid, measured as a pathologist reports them.

Grid convention as in `wsi_vssm.outputs.heatmap`: `prob` is (rows, cols), cell (i, j) covers the level-0 box
x in [x0 + j * cell0, x0 + (j + 1) * cell0), y in [y0 + i * cell0, y0 + (i + 1) * cell0), NaN = no tissue.

* Hot cells: `prob >= threshold` (NaN never counts).
* With an `extent_threshold` below `threshold` (hysteresis): a lesion is a group of cells at or above
  `extent_threshold` that holds at least one cell at or above `threshold`. The higher threshold decides where
  there is tumour (its false-positive rate is that of the seeds); the lower one measures how far it reaches.
  Which rule a model uses (extent threshold, merge distance) is chosen on selection-part patients by
  bench/lesion_rule.py and stored in its file (docs/model_card.md).
* Lesions: two hot cells belong to the same lesion when the gap between their boxes is at most
  `merge_distance_cells` cell widths (Euclidean, edge to edge), transitively. With 0 only cells that share an
  edge or a corner (8-connected) join; with the default 1, pieces separated by one cold (or NaN) cell, about
  31 um for the default model, i.e. a few tumour cells, are one lesion. Region seams therefore never split one.
* `diameter_mm`, the longest diameter (CAMELYON17 measures metastases by their largest extent): the largest
  distance between the centres of two of the lesion's cells, plus one cell width, so each end of the line reaches
  the outer edge of its end cell. A single cell measures one cell (one token, about 0.03 mm). For a shape drawn
  on the grid it lies within one cell of the shape's true longest diameter.
* `area_mm2`: number of hot cells x cell area. `peak_probability`, `mean_probability`: over the hot cells.
* `category`: by the longest diameter alone: `itc` (<= 0.2 mm), `micro` (<= 2 mm), `macro` (> 2 mm). The
  other ITC criterion (fewer than 200 cells) cannot be measured at token resolution.

Lesions are numbered 1, 2, ... from the largest diameter down (ties: larger area, then top-left first).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from wsi_vssm.atomic import atomic_write_text
from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.files import spreadsheet_safe
from wsi_vssm.outputs.heatmap import _grid, _pair, _positive

ITC_MAX_MM = 0.2  # isolated tumour cells: up to 0.2 mm
MICRO_MAX_MM = 2.0  # micrometastasis: over 0.2 mm, up to 2 mm; macrometastasis: over 2 mm
LESION_CATEGORIES = ("itc", "micro", "macro")
DEFAULT_MERGE_DISTANCE_CELLS = 1.0
LESION_COLUMNS = (
    "id", "x", "y", "width", "height", "area_mm2", "diameter_mm", "peak_probability", "mean_probability", "category",
)  # fmt: skip
_EPS_MM = 1e-9  # a diameter equal to a limit (up to rounding) falls in the lower category


@dataclass(frozen=True)
class Lesion:
    """One lesion. Box in level-0 px; `cells` is the number of hot cells."""

    id: int
    x: float
    y: float
    width: float
    height: float
    area_mm2: float
    diameter_mm: float
    peak_probability: float
    mean_probability: float
    category: str
    cells: int = 0

    def as_dict(self) -> dict:
        """The `lesions.csv` columns, in order (for prediction.json)."""
        d = asdict(self)
        return {c: d[c] for c in LESION_COLUMNS}


def lesion_category(diameter_mm: float) -> str:
    """`itc` (<= 0.2 mm), `micro` (<= 2 mm) or `macro` (> 2 mm), from the longest diameter alone."""
    d = float(diameter_mm)
    if not (math.isfinite(d) and d >= 0):
        raise UsageError(f"lesion diameter must be a non-negative number of mm, got {diameter_mm!r}")
    if d <= ITC_MAX_MM + _EPS_MM:
        return "itc"
    return "micro" if d <= MICRO_MAX_MM + _EPS_MM else "macro"


def node_category(diameters_mm: Iterable[float]) -> str:
    """A node's category from its lesions' diameters: that of the largest, or `negative` without lesions."""
    ds = [float(d) for d in diameters_mm]
    return lesion_category(max(ds)) if ds else "negative"


def label_lesions(prob: np.ndarray, threshold: float, merge_distance_cells: float = DEFAULT_MERGE_DISTANCE_CELLS,
                  seed_threshold: float | None = None):
    """(labels, n): an int32 grid of `prob`'s shape with lesion k + 1 on its hot cells (0 elsewhere), and the
    number of lesions. Numbering here is by first cell in row-major order; `find_lesions` renumbers by size.
    With `seed_threshold`, only groups holding a cell at or above it are lesions."""
    prob = _grid(prob)
    threshold = _finite(threshold, "threshold")
    if seed_threshold is not None:
        labels, n = label_lesions(prob, threshold, merge_distance_cells)
        seeded = np.unique(labels[np.nan_to_num(prob, nan=-np.inf) >= _finite(seed_threshold, "seed threshold")])
        keep = np.zeros(n + 1, np.int32)
        keep[seeded[seeded > 0]] = 1
        keep[1:] = np.cumsum(keep[1:]) * keep[1:]  # kept groups renumbered 1.. in their first-cell order
        return keep[labels], int(keep.max())
    d = _finite(merge_distance_cells, "merge distance")
    if d < 0:
        raise UsageError(f"merge distance must be >= 0 cells, got {merge_distance_cells!r}")
    hot = np.nan_to_num(prob, nan=-np.inf) >= threshold
    rows, cols = np.nonzero(hot)
    n = rows.size
    labels = np.zeros(prob.shape, np.int32)
    if n == 0:
        return labels, 0
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    index = np.full(prob.shape, -1, np.int64)
    index[rows, cols] = np.arange(n)
    src, dst = [], []
    for di, dj in _offsets(d):
        r2, c2 = rows + di, cols + dj
        ok = (r2 >= 0) & (r2 < prob.shape[0]) & (c2 >= 0) & (c2 < prob.shape[1])
        other = np.full(n, -1, np.int64)
        other[ok] = index[r2[ok], c2[ok]]
        keep = other >= 0
        src.append(np.nonzero(keep)[0])
        dst.append(other[keep])
    src_a, dst_a = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(src_a.size, np.int8), (src_a, dst_a)), shape=(n, n))
    count, comp = connected_components(graph, directed=False)
    # renumber components by their first cell in row-major order (np.nonzero order), 1-based
    _, first = np.unique(comp, return_index=True)
    order = np.empty(count, np.int64)
    order[np.argsort(first)] = np.arange(count)
    labels[rows, cols] = order[comp] + 1
    return labels, int(count)


def _offsets(d: float) -> list[tuple[int, int]]:
    """Half of the neighbourhood (the other half is the same edges reversed): cell offsets whose box gap is <= d."""
    r = int(math.floor(d)) + 1
    out = []
    for di in range(0, r + 1):
        for dj in range(-r, r + 1):
            if (di, dj) <= (0, 0):
                continue
            gap = math.hypot(max(abs(di) - 1, 0), max(abs(dj) - 1, 0))
            if gap <= d + 1e-9:
                out.append((di, dj))
    return out


def find_lesions(
    prob: np.ndarray,
    cell0: float,
    origin: tuple[float, float],
    mpp: float,
    threshold: float = 0.5,
    merge_distance_cells: float = DEFAULT_MERGE_DISTANCE_CELLS,
    extent_threshold: float | None = None,
) -> list[Lesion]:
    """The lesions of a probability grid, largest first, measured in level-0 px and mm (see the module doc).

    `cell0`, `origin` (x0, y0): the grid's cell side and top-left corner in level-0 px; `mpp`: the slide's
    level-0 microns per pixel; `extent_threshold` (<= threshold; None: = threshold): where lesions end.
    """
    lesions, _ = find_lesions_and_labels(prob, cell0, origin, mpp, threshold, merge_distance_cells, extent_threshold)
    return lesions


def find_lesions_and_labels(
    prob: np.ndarray,
    cell0: float,
    origin: tuple[float, float],
    mpp: float,
    threshold: float = 0.5,
    merge_distance_cells: float = DEFAULT_MERGE_DISTANCE_CELLS,
    extent_threshold: float | None = None,
) -> tuple[list[Lesion], np.ndarray]:
    """`find_lesions`, plus the int32 label grid whose cells hold the final lesion ids (0 = no lesion)."""
    prob = _grid(prob)
    cell0, mpp = _positive(cell0, "cell0"), _positive(mpp, "slide mpp")
    x0, y0 = _pair(origin, "origin")
    threshold = _finite(threshold, "threshold")
    if extent_threshold is None:
        labels, n = label_lesions(prob, threshold, merge_distance_cells)
    else:
        extent = _finite(extent_threshold, "extent threshold")
        if extent > threshold:
            raise UsageError(f"the lesion extent threshold {extent:g} is above the cell threshold {threshold:g}")
        labels, n = label_lesions(prob, extent, merge_distance_cells, seed_threshold=threshold)
    if n == 0:
        return [], labels
    from scipy import ndimage as ndi

    cell_mm = cell0 * mpp / 1000.0
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols]
    values = prob[rows, cols].astype(np.float64)
    counts = np.bincount(lab, minlength=n + 1)[1:]
    means = np.bincount(lab, weights=values, minlength=n + 1)[1:] / counts
    order = np.argsort(lab, kind="stable")
    ends = np.cumsum(counts)
    peaks = np.maximum.reduceat(values[order], ends - counts)
    ferets = np.zeros(n)
    for k in np.nonzero(counts > 1)[0]:  # one cell: 0; only larger lesions need the geometry
        idx = order[ends[k] - counts[k] : ends[k]]
        ferets[k] = centre_feret(rows[idx], cols[idx])
    diameters = (ferets + 1.0) * cell_mm
    boxes = ndi.find_objects(labels)
    rank = sorted(range(n), key=lambda k: (-diameters[k], -counts[k], boxes[k][0].start, boxes[k][1].start))
    out = []
    relabel = np.zeros(n + 1, np.int32)
    for new_id, k in enumerate(rank, start=1):
        relabel[k + 1] = new_id
        (r0, r1), (c0, c1) = (boxes[k][0].start, boxes[k][0].stop), (boxes[k][1].start, boxes[k][1].stop)
        d = float(diameters[k])
        out.append(
            Lesion(
                id=new_id, x=x0 + c0 * cell0, y=y0 + r0 * cell0, width=(c1 - c0) * cell0, height=(r1 - r0) * cell0,
                area_mm2=float(counts[k]) * cell_mm * cell_mm, diameter_mm=d, peak_probability=float(peaks[k]),
                mean_probability=float(means[k]), category=lesion_category(d), cells=int(counts[k]),
            )
        )  # fmt: skip
    return out, relabel[labels]


def centre_feret(rows: np.ndarray, cols: np.ndarray) -> float:
    """Largest distance (in cells) between two of the given cell centres; 0 for one cell."""
    pts = np.stack([np.asarray(cols, np.float64), np.asarray(rows, np.float64)], 1)
    if len(pts) <= 1:
        return 0.0
    return max_pairwise_distance(_hull_points(pts) if len(pts) > 64 else pts)


def max_pairwise_distance(pts: np.ndarray) -> float:
    """Largest distance between two rows of an (n, 2) array; 0 for fewer than two."""
    pts = np.asarray(pts, np.float64)
    best = 0.0
    for start in range(0, len(pts), 1024):  # bounded memory however many points there are
        block = pts[start : start + 1024]
        best = max(best, float(((block[:, None, :] - pts[None, :, :]) ** 2).sum(-1).max()))
    return math.sqrt(best)


def _hull_points(pts: np.ndarray) -> np.ndarray:
    """The convex hull's vertices (the farthest pair is always among them); all points when they are collinear."""
    from scipy.spatial import ConvexHull, QhullError

    try:
        return pts[ConvexHull(pts).vertices]
    except QhullError:  # collinear: the extreme points along the line are the lexicographic ends
        order = np.lexsort((pts[:, 1], pts[:, 0]))
        return pts[[order[0], order[-1]]]


def polygon_feret_mm(geom, mpp: float) -> float:
    """Longest diameter (mm) of a shapely geometry in level-0 px: the largest distance between two of its points."""
    import shapely

    mpp = _positive(mpp, "slide mpp")
    if geom is None or geom.is_empty:
        return 0.0
    return max_pairwise_distance(shapely.get_coordinates(geom.convex_hull)) * mpp / 1000.0


def lesion_ids_for_polygons(polygons: Sequence, labels: np.ndarray, cell0: float, origin: tuple[float, float]):
    """The lesion id (from `find_lesions_and_labels`' label grid) under each contour polygon, 0 when none.

    Each polygon's representative point lies inside one of its cells; the id there is the polygon's lesion. Use
    it to give `contours.geojson` features the id and category of their lesion.
    """
    cell0 = _positive(cell0, "cell0")
    x0, y0 = _pair(origin, "origin")
    ids = []
    for poly in polygons:
        p = poly.representative_point()
        i, j = int(math.floor((p.y - y0) / cell0)), int(math.floor((p.x - x0) / cell0))
        inside = 0 <= i < labels.shape[0] and 0 <= j < labels.shape[1]
        ids.append(int(labels[i, j]) if inside else 0)
    return ids


def _lesion_cells(les: Lesion) -> list[str]:
    """A lesion's `LESION_COLUMNS` as written: box to 10 significant digits, diameter to 6 decimals."""
    return [
        str(les.id), f"{les.x:.10g}", f"{les.y:.10g}", f"{les.width:.10g}", f"{les.height:.10g}",
        f"{les.area_mm2:.8g}", f"{les.diameter_mm:.6f}", f"{les.peak_probability:.6f}",
        f"{les.mean_probability:.6f}", les.category,
    ]  # fmt: skip


def lesions_csv_text(lesions: Iterable[Lesion]) -> str:
    """`lesions.csv` as text: header `LESION_COLUMNS`, one row per lesion (`_lesion_cells`)."""
    return "".join(",".join(row) + "\n" for row in [list(LESION_COLUMNS), *map(_lesion_cells, lesions)])


def write_lesions_csv(path: str | os.PathLike, lesions: Iterable[Lesion]) -> None:
    """Write `lesions.csv` atomically (a header alone when there are no lesions)."""
    atomic_write_text(path, lesions_csv_text(lesions))


def write_cohort_lesions_csv(path: str | os.PathLike, slides: Iterable[tuple[str, str | os.PathLike]]) -> list[str]:
    """A cohort's lesions in one table, written atomically: column `slide`, then `LESION_COLUMNS`; the rows of
    each (slide name, its lesions.csv) in the order given, values exactly as that file holds them. A slide whose
    table cannot be read is left out; the returned lines say which and why."""
    import csv

    buf = io.StringIO()
    rows = csv.writer(buf, lineterminator="\n")  # a slide name may hold a comma or a quote
    rows.writerow(("slide", *LESION_COLUMNS))
    problems = []
    for name, table in slides:
        try:
            lesions = read_lesions_csv(table)
        except UsageError as err:
            problems.append(str(err))
            continue
        # the name as predictions.csv writes it: a formula-like name is text there and here, and the two join
        rows.writerows([spreadsheet_safe(name), *_lesion_cells(les)] for les in lesions)
    atomic_write_text(path, buf.getvalue())
    return problems


def read_lesions_csv(path: str | os.PathLike) -> list[Lesion]:
    """Read back a `lesions.csv` written by `write_lesions_csv`."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != LESION_COLUMNS:
                raise UsageError(f"{os.fspath(path)}: lesions table needs columns {','.join(LESION_COLUMNS)}")
            return [_lesion_row(r) for r in reader]
    except OSError as err:
        raise UsageError(f"{os.fspath(path)}: cannot read lesions table: {err.strerror or err}") from err
    except (ValueError, TypeError) as err:  # TypeError: a short row's missing cells read as None
        raise UsageError(f"{os.fspath(path)}: malformed lesions table: {err}") from err


def _lesion_row(r: dict) -> Lesion:
    floats = {c: float(r[c]) for c in LESION_COLUMNS[1:-1]}
    if r["category"] not in LESION_CATEGORIES:
        raise ValueError(f"unknown category {r['category']!r}")
    return Lesion(id=int(r["id"]), category=r["category"], **floats)


def _finite(v, what: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number, got {v!r}") from None
    if not math.isfinite(f):
        raise UsageError(f"{what} must be finite, got {v!r}")
    return f
