"""napari layer data for slides and prediction outputs: plain (data, kwargs, layer_type) tuples, no Qt.

Placement follows the grid convention of `wsi_vssm.outputs.heatmap`: in world coordinates (micrometres when
the slide's mpp is known) slide pixel k's centre is at k * mpp, the heatmap keeps the scale and translation
stored in its OME-Zarr, and contour vertices (level-0 pixel edges, QuPath's convention) are shifted by half a
pixel so that they fall on the heatmap's cell edges.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
from pathlib import Path

import numpy as np

from wsi_vssm.io.base import SlideReader
from wsi_vssm.outputs import files
from wsi_vssm.outputs.colors import CONTRAST_LIMITS

CHUNK = 1024  # px per side of one lazily read block of a slide level
DEFAULT_CELL_THRESHOLD = 0.5
CONTOUR_COLOR = "#00ff66"  # green: stands out against both H&E and the heatmap's reds
META_KEY = "wsi_vssm"  # layer.metadata[META_KEY] says what a layer is ("slide", "heatmap", "contours")


class _LevelArray:
    """One pyramid level as an array-like (h, w, 3) uint8 that reads only the boxes it is indexed with."""

    def __init__(self, slide: SlideReader, level: int, lock: threading.Lock):
        self.slide, self.level, self.lock = slide, level, lock
        w, h = slide.level_dimensions[level]
        self.shape = (h, w, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key) -> np.ndarray:
        ys, xs = (key + (slice(None), slice(None)))[:2] if isinstance(key, tuple) else (key, slice(None))
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        rest = key[2:] if isinstance(key, tuple) else ()
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)[(slice(None), slice(None), *rest)]
        ds = self.slide.level_downsamples[self.level]
        # ceil: read_region floors location / ds back to exactly (x0, y0) at this level
        loc = (math.ceil(x0 * ds), math.ceil(y0 * ds))
        with self.lock:  # one decoder per slide handle; backends are not all thread-safe
            tile = self.slide.read_region(loc, self.level, (x1 - x0, y1 - y0))
        return tile[(slice(None), slice(None), *rest)]


def slide_pyramid(slide: SlideReader, chunk: int = CHUNK) -> list:
    """One dask array (h, w, 3) uint8 per level, finest first; a block is read only when it is computed."""
    import dask.array as da

    lock = threading.Lock()
    token = uuid.uuid4().hex  # distinct graph names: never tokenize (hash) the reader itself
    return [
        da.from_array(_LevelArray(slide, k, lock), chunks=(chunk, chunk, 3), asarray=False, fancy=False,
                      name=f"wsi-vssm-{token}-level{k}")
        for k in range(slide.level_count)
    ]  # fmt: skip


def slide_layer(slide: SlideReader, name: str | None = None) -> tuple:
    """A multiscale RGB image layer over `slide`, scaled to micrometres when its mpp is known."""
    mpp = slide.mpp
    kwargs = {
        "name": name or slide.name,
        "rgb": True,
        "multiscale": True,
        "contrast_limits": (0, 255),
        "metadata": {
            META_KEY: {
                "kind": "slide",
                "path": None if slide.path is None else str(slide.path),
                "mpp": mpp,
                "mpp_source": slide.mpp_source,
                "dimensions": list(slide.dimensions),
            }
        },
    }
    if mpp is not None:
        kwargs.update(scale=(mpp, mpp), units=("um", "um"))
    return slide_pyramid(slide), kwargs, "image"


def heatmap_colormap(cell_threshold: float = DEFAULT_CELL_THRESHOLD):
    """The overlay's colour rule (`wsi_vssm.outputs.colors`) as a napari colormap over [0, 1]: transparent
    below the cell threshold, a perceptual colour map with rising opacity above it."""
    from napari.utils.colormaps import Colormap

    from wsi_vssm.outputs.colors import heatmap_lut

    controls, colors = heatmap_lut(cell_threshold)
    return Colormap(colors=colors, controls=controls, name=f"wsi-vssm tumour probability >= {cell_threshold:.3f}")


def heatmap_layer(path: str | Path) -> tuple:
    """The heatmap OME-Zarr's finest level as an image layer placed by its stored scale and translation (um).

    Raises UsageError when `path` is not a wsi-vssm heatmap.
    """
    from wsi_vssm.outputs.heatmap import read_heatmap_zarr

    prob, cell_um, translation, attrs = read_heatmap_zarr(path, 0)
    block = dict(attrs.get(META_KEY) or {})
    slide = block.get("slide") or Path(path).parent.name
    # `threshold`: the key of heatmaps written before prediction.json v2
    threshold = float(block.get("cell_threshold", block.get("threshold", DEFAULT_CELL_THRESHOLD)))
    kwargs = {
        "name": f"{slide} heatmap",
        "scale": (cell_um, cell_um),
        "translate": tuple(translation[-2:]),
        "units": ("um", "um"),
        "colormap": heatmap_colormap(threshold),
        "contrast_limits": CONTRAST_LIMITS,
        "opacity": 1.0,  # the colormap carries the opacity
        "blending": "translucent",
        "interpolation2d": "nearest",
        "metadata": {META_KEY: {**block, "kind": "heatmap", "path": str(path)}},
    }
    return prob, kwargs, "image"


def contours_layer(path: str | Path, mpp: float, name: str = "contours", edge_width_px: float = 2.0) -> tuple:
    """The tumour polygons of a contours.geojson (level-0 px) as a Shapes layer in micrometres.

    Holes are drawn as outlines of their own. `edge_width_px` is in level-0 pixels.
    """
    from wsi_vssm.outputs.contours import read_contours_geojson

    shapes, names, labels, probs, ids, categories, areas = [], [], [], [], [], [], []
    for feat in read_contours_geojson(path):
        lesion = feat.properties.get("lesion_id")
        area = (feat.properties.get("measurements") or {}).get("Area um^2")
        for k, ring in enumerate(feat.rings):
            shapes.append(ring[:, ::-1].copy())  # (x, y) -> napari's (y, x)
            names.append(feat.name)
            labels.append(feat.name if k == 0 else "")  # one label a lesion, not one per piece or hole
            probs.append(feat.max_probability)
            ids.append(-1 if lesion is None else int(lesion))  # -1: a GeoJSON without our lesion ids
            categories.append(str(feat.properties.get("category") or ""))
            areas.append(math.nan if area is None else float(area))
    kwargs = {
        "name": name,
        "shape_type": "polygon",
        "scale": (mpp, mpp),
        "translate": (-0.5 * mpp, -0.5 * mpp),  # a pixel's edge lies half a pixel before its centre
        "units": ("um", "um"),
        "edge_color": CONTOUR_COLOR,
        "face_color": "transparent",
        "edge_width": edge_width_px,
        # as QuPath shows them: lesions.csv's id and category, and the feature's (the whole lesion's) area
        "text": {"string": "{label}", "color": CONTOUR_COLOR, "size": 9, "anchor": "upper_left"},
        "features": {"name": names, "label": labels, "max_probability": np.asarray(probs, dtype=float),
                     "lesion_id": np.asarray(ids, dtype=int), "category": categories,
                     "area_um2": np.asarray(areas, dtype=float)},
        "metadata": {META_KEY: {"kind": "contours", "path": str(path), "mpp": mpp}},
    }
    return shapes, kwargs, "shapes"


CALL_KEYS = ("slide", "probability", "label", "slide_threshold", "threshold", "reason", "in_domain", "domain_notes")


def _prediction_call(path: Path) -> dict:
    """The slide's call from its prediction.json (probability, decision, threshold, domain verdict, and the
    warnings predict gave with it, e.g. a call resting on no cell), for the heatmap layer's metadata; when the
    file is missing or unreadable, `{"error": why}` (the layers still open, and the reader says why there is no
    call)."""
    from wsi_vssm.errors import UsageError
    from wsi_vssm.outputs.prediction import read_prediction_json

    if not path.is_file():
        return {"error": f"{path}: no such file: the slide's call cannot be shown"}
    try:
        record = read_prediction_json(path)
    except UsageError as e:
        return {"error": f"{e}: the slide's call cannot be shown"}
    said = (record.get("summary") or {}).get("warnings")
    said = said if isinstance(said, list) else [said] if isinstance(said, str) else []  # a string is one warning
    return {**{k: record.get(k) for k in CALL_KEYS}, "warnings": said}


def prediction_layers(folder: str | Path, tries: int = 3) -> list[tuple]:
    """Heatmap and contours layers of one `wsi-vssm predict` output folder (its heatmap must exist). Each file is
    replaced atomically, the folder is not: a rerun with another threshold writing while this reads could give
    one run's heatmap with another's contours, so the files are read again when any of them was replaced."""
    folder = Path(folder)
    for _ in range(tries - 1):
        before = _identities(folder)
        layers = _prediction_layers(folder)
        if _identities(folder) == before:
            return layers
    return _prediction_layers(folder)


def _identities(folder: Path) -> list:
    """(inode, mtime) of the files a prediction's layers are read from; None for one that is not there."""
    found = []
    for path in (folder / files.HEATMAP_ZARR / ".zattrs", folder / files.PREDICTION_JSON,
                 folder / files.CONTOURS_GEOJSON):
        try:
            st = os.stat(path)
            found.append((st.st_ino, st.st_mtime_ns))
        except OSError:
            found.append(None)
    return found


def _prediction_layers(folder: Path) -> list[tuple]:
    heat = heatmap_layer(folder / files.HEATMAP_ZARR)
    call = _prediction_call(folder / files.PREDICTION_JSON)
    heat[1]["metadata"][META_KEY]["prediction"] = None if "error" in call else call
    if "error" in call:
        heat[1]["metadata"][META_KEY]["prediction_error"] = call["error"]
    layers = [heat]
    contours = folder / files.CONTOURS_GEOJSON
    if contours.is_file():
        block = heat[1]["metadata"][META_KEY]
        if not isinstance(block.get("mpp"), int | float):  # an edited or foreign heatmap: said, not a KeyError
            from wsi_vssm.errors import UsageError

            raise UsageError(f"{folder / files.HEATMAP_ZARR}: its metadata gives no mpp, so its contours cannot be "
                             "placed; predict the slide again")
        mpp = float(block["mpp"])
        rows, cols = heat[0].shape
        extent_px = max(rows, cols) * float(block.get("cell0", 1.0))
        slide = block.get("slide") or folder.name
        layers.append(contours_layer(contours, mpp, f"{slide} contours", edge_width_px=max(2.0, extent_px / 400)))
    return layers
