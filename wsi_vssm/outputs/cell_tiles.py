"""The heatmap's cells as QuPath tiles (`cells.geojson`, `predict --cells-geojson`).

QuPath cannot lay heatmap.ome.zarr over a slide, but it imports GeoJSON objects in level-0 pixels and colours
detections by a measurement (Measure > Show measurement maps). So every tissue cell of the heatmap becomes one
square `tile` object carrying its probability as the measurement "Tumor probability" (level 0 of
heatmap.ome.zarr, the calibrated cell probability), and the cells at or above the cell threshold are classed
"Tumor", as the overlay colours them. Cells without tissue (0 in the heatmap, NaN in memory) are left out.

The file is written feature by feature, one per line, so a slide of a million cells never holds them all as
Python objects: about 250 bytes a cell (docs/outputs.md has the figures).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from wsi_vssm.atomic import atomic_file, to_jsonable
from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.contours import TUMOR_CLASS

MEASUREMENT = "Tumor probability"
_TUMOR = json.dumps({"name": TUMOR_CLASS["name"], "color": TUMOR_CLASS["color"]}, separators=(",", ":"))
_BATCH = 20_000  # features joined per write


def write_cells_geojson(path: str | os.PathLike, grid: np.ndarray, cell0: float, origin: tuple[float, float],
                        cell_threshold: float, about: dict | None = None) -> int:
    """Write the tissue cells of `grid` (rows, cols; NaN or 0 where there is no tissue; the heatmap grid
    convention of `outputs.heatmap`) to `path` atomically as a FeatureCollection of QuPath tiles; returns how many.
    `about` (slide, model, thresholds, in_domain...) goes into the collection's `wsi_vssm` member, which GeoJSON
    readers ignore."""
    grid, cell0 = np.asarray(grid, np.float32), float(cell0)  # float32 edges were off by 0.01 px at 227,000 px
    if grid.ndim != 2:
        raise UsageError(f"a cell grid must be 2-D, got shape {grid.shape}")
    if not (math.isfinite(cell0) and cell0 > 0):
        raise UsageError(f"cell0 must be a positive number of level-0 px, got {cell0!r}")
    x0, y0 = (float(v) for v in origin)
    if not (math.isfinite(x0) and math.isfinite(y0)):  # JSON has no NaN
        raise UsageError(f"the grid's origin must be finite level-0 px, got {origin!r}")
    # each edge's text once: neighbours share it exactly, and the loop below only joins strings
    xs = [_num(x0 + j * cell0) for j in range(grid.shape[1] + 1)]
    ys = [_num(y0 + i * cell0) for i in range(grid.shape[0] + 1)]
    rows, cols = np.nonzero(np.isfinite(grid) & (grid > 0))
    probs = grid[rows, cols]
    tumour = probs >= cell_threshold  # as the overlay and the lesions compare the float32 grid
    head = {"type": "FeatureCollection", "wsi_vssm": {**(about or {}), "cell0": cell0, "origin": [x0, y0],
                                                      "cell_threshold": cell_threshold, "measurement": MEASUREMENT}}
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(to_jsonable(head), ensure_ascii=False)[:-1] + ',"features":[\n')
        for start in range(0, len(probs), _BATCH):
            stop = min(start + _BATCH, len(probs))
            part = slice(start, stop)
            # float32's shortest text that reads back as the same float32 (0.9, not 0.899999976)
            cells = zip(rows[part].tolist(), cols[part].tolist(), probs[part].astype(str).tolist(),
                        tumour[part].tolist(), strict=True)
            f.write(",\n".join(_feature(xs[c], xs[c + 1], ys[r], ys[r + 1], p, t) for r, c, p, t in cells))
            f.write(",\n" if stop < len(probs) else "\n")
        f.write("]}\n")
    return int(len(probs))


def _feature(a: str, b: str, top: str, bottom: str, p: str, tumour: bool) -> str:
    # exterior counter-clockwise as contours.geojson writes it (RFC 7946, in x-right / y-up terms)
    ring = f"[[{a},{top}],[{b},{top}],[{b},{bottom}],[{a},{bottom}],[{a},{top}]]"
    cls = f',"classification":{_TUMOR}' if tumour else ""
    return ('{"type":"Feature","geometry":{"type":"Polygon","coordinates":[' + ring + ']},"properties":'
            f'{{"objectType":"tile"{cls},"measurements":{{"{MEASUREMENT}":{p}}}}}}}')


def _num(v: float) -> str:
    """A coordinate to 1/1000 px, without a trailing ".0"."""
    text = f"{round(v, 3):.3f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text
