"""The tumour-probability heatmap: its grid convention and its OME-Zarr (NGFF 0.4) pyramid.

Grid convention (shared by every output and by the napari plugin)
-----------------------------------------------------------------
The per-cell probability grid `prob` is a 2-D float32 array (rows, cols). Cell (i, j) covers the level-0 pixel
box

    x in [x0 + j * cell0, x0 + (j + 1) * cell0),   y in [y0 + i * cell0, y0 + (i + 1) * cell0)

where `origin = (x0, y0)` is the grid's top-left corner in level-0 pixels and `cell0` is the cell side in
level-0 pixels (= token_px * model_mpp / slide_mpp, a float). Level-0 pixel (k, l) is the unit square
[k, k + 1) x [l, l + 1) in these coordinates (OpenSlide's and QuPath's), so its centre is (k + 0.5, l + 0.5).
Cells without tissue, or not computed, are NaN in memory.

Physical placement (napari's convention: a layer with scale s and translate t puts pixel i's centre at
i * s + t, so slide pixel k's centre is at k * mpp micrometres): heatmap pixel (i, j) has its centre at the
centre of cell (i, j), i.e.

    scale       = cell_um = cell0 * mpp
    translation = (origin + cell0 / 2 - 1 / 2) * mpp        (per axis, y then x in the file)

so opening the slide with scale mpp and the heatmap with the stored scale and translation overlays them.

On disk
-------
`heatmap.ome.zarr` is a zarr format-2 group (zarr-python 3 writes it with `zarr_format=2`, "/" chunk keys and
Blosc-LZ4) because format 2 is what OME-NGFF 0.4 readers (napari-ome-zarr / ome-zarr-py, QuPath, vizarr)
read. The root is one multiscale image named "probability", axes (y, x) in micrometres, float32 in [0, 1] with
0 where there is no tissue (NaN would break viewers' contrast limits). Level k is level k - 1 max-pooled 2 x 2
(so a small lesion stays visible when zoomed out), down to a longer side under `min_side` (256). The root
`.zattrs` also holds a `wsi_vssm` block: the slide name, model, mpp, cell_um, cell0, origin, threshold and the
grid convention, plus anything the caller passes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from wsi_vssm.atomic import atomic_dir, to_jsonable
from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.files import ALL_CHUNKS, missing_chunks

NGFF_VERSION = "0.4"
IMAGE_NAME = "probability"
CHUNK = 256


def heatmap_transform(cell0: float, origin: tuple[float, float], slide_mpp: float):
    """(scale_um, (ty, tx)) placing heatmap pixel centres at their cells' centres; see the module docstring."""
    cell0, slide_mpp = _positive(cell0, "cell0"), _positive(slide_mpp, "slide mpp")
    x0, y0 = _pair(origin, "origin")
    cell_um = cell0 * slide_mpp
    return cell_um, ((y0 + cell0 / 2 - 0.5) * slide_mpp, (x0 + cell0 / 2 - 0.5) * slide_mpp)


def pyramid(prob: np.ndarray, min_side: int = CHUNK) -> list[np.ndarray]:
    """[level 0, level 1, ...]: NaN -> 0, then 2 x 2 max-pooling until the longer side is under `min_side`."""
    level = np.nan_to_num(np.asarray(prob, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    levels = [level]
    while max(level.shape) >= min_side and max(level.shape) > 1:
        h, w = level.shape
        padded = np.zeros((h + h % 2, w + w % 2), dtype=np.float32)  # 0 = no tissue, never wins a max
        padded[:h, :w] = level
        level = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).max(axis=(1, 3))
        levels.append(level)
    return levels


def write_heatmap_zarr(
    path: str | os.PathLike,
    prob: np.ndarray,
    cell0: float,
    origin: tuple[float, float],
    slide_mpp: float,
    *,
    attrs: dict | None = None,
    min_side: int = CHUNK,
) -> Path:
    """Write `prob` (grid convention above) as an OME-Zarr NGFF 0.4 multiscale image at `path`, atomically.

    `cell0` and `origin` (x0, y0) are in level-0 pixels, `slide_mpp` is the slide's level-0 microns per pixel.
    `attrs` (e.g. slide, model, threshold) are stored in the `wsi_vssm` block of `.zattrs`. Returns `path`.
    """
    import numcodecs
    import zarr

    prob = _grid(prob)
    cell_um, (ty, tx) = heatmap_transform(cell0, origin, slide_mpp)
    levels = pyramid(prob, min_side)
    datasets = []
    for k, _ in enumerate(levels):
        f = 2**k
        # A coarse pixel's centre is the mean of the f x f fine centres it pools: shift by (f - 1) / 2 fine pixels.
        shift = (f - 1) / 2 * cell_um
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [cell_um * f, cell_um * f]},
                    {"type": "translation", "translation": [ty + shift, tx + shift]},
                ],
            }
        )
    multiscale = {
        "version": NGFF_VERSION,
        "name": IMAGE_NAME,
        "axes": [
            {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"},
        ],
        "datasets": datasets,
        "type": "max",  # 2 x 2 max-pooling
        "metadata": {"description": "tumour probability per token cell; 0 where there is no tissue"},
    }
    block = {
        **(attrs or {}),
        "cell_um": cell_um,
        "cell0": float(cell0),
        "origin": [float(origin[0]), float(origin[1])],
        "mpp": float(slide_mpp),
        "shape": list(prob.shape),
        "convention": "pixel centre = cell centre; slide pixel k centre at k * mpp um (napari)",
        # every chunk is on disk, all-background ones too, so a lost chunk is found (read_heatmap_zarr), not
        # read as "no tissue" (zarr's default skips chunks equal to the fill value)
        ALL_CHUNKS: True,
    }
    with atomic_dir(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        for k, level in enumerate(levels):
            arr = group.create_array(
                str(k),
                shape=level.shape,
                chunks=(min(CHUNK, level.shape[0]), min(CHUNK, level.shape[1])),
                dtype="float32",
                fill_value=0.0,
                compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
                chunk_key_encoding={"name": "v2", "separator": "/"},  # NGFF 0.4 requires "/" chunk keys
                config={"write_empty_chunks": True},
            )
            arr[...] = level
        group.attrs.update({"multiscales": [multiscale], "wsi_vssm": to_jsonable(block)})
    return Path(path)


# More cells than any slide gives (a 200,000 px side at 0.25 um/px in 32 px cells is 6,250 x 6,250 cells, 39 M);
# what a heatmap's metadata declares is checked against it before its level is read whole
MAX_HEATMAP_CELLS = 1 << 27


def read_heatmap_zarr(path: str | os.PathLike, level: int = 0):
    """(prob, cell_um, (ty, tx), attrs) of a heatmap written by `write_heatmap_zarr`.

    `prob` is level `level` as float32 with 0 where there was no tissue (the file does not keep NaN), `cell_um`
    and the translation are that level's scale and translation in micrometres, `attrs` the root `.zattrs`.
    """
    import zarr

    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = group.attrs.asdict()
        datasets = attrs["multiscales"][0]["datasets"]
        if not 0 <= level < len(datasets):  # a valid heatmap of fewer levels: say so, not "not a heatmap"
            raise UsageError(f"{path}: level {level} does not exist; the heatmap has {len(datasets)} level(s), "
                             f"0-{len(datasets) - 1}")
        ds = datasets[level]
        transforms = {t["type"]: t for t in ds["coordinateTransformations"]}
        arr = group[ds["path"]]
        if arr.size > MAX_HEATMAP_CELLS:  # 1 KB of metadata declared 60,000 x 60,000 (13.4 GiB to read)
            raise UsageError(f"{path}: damaged heatmap: level {level} declares {' x '.join(map(str, arr.shape))} "
                             f"cells, more than a slide has (up to {MAX_HEATMAP_CELLS:,})")
        if (attrs.get("wsi_vssm") or {}).get(ALL_CHUNKS) and missing_chunks(arr):
            raise UsageError(f"{path}: damaged heatmap: {missing_chunks(arr)} of {arr.nchunks} "
                             f"chunks of level {level} missing")
        prob = np.asarray(arr[...], dtype=np.float32)
        cell_um = float(transforms["scale"]["scale"][-1])
        translation = tuple(float(v) for v in transforms.get("translation", {"translation": [0, 0]})["translation"])
    except UsageError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, FileNotFoundError) as err:
        raise UsageError(f"{path}: not a wsi-vssm heatmap (OME-Zarr): {type(err).__name__}: {err}") from err
    except Exception as err:  # noqa: BLE001 - a chunk that does not decode (blosc's RuntimeError, a cut copy)
        raise UsageError(f"{path}: damaged heatmap: {type(err).__name__}: {err}") from err
    return prob, cell_um, translation, attrs


def _grid(prob) -> np.ndarray:
    a = np.asarray(prob)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise UsageError(f"heatmap must be a non-empty 2-D (rows, cols) array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number):
        raise UsageError(f"heatmap must be numeric, got dtype {a.dtype}")
    return a.astype(np.float32, copy=False)


def _positive(v, what: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a positive number, got {v!r}") from None
    if not (math.isfinite(f) and f > 0):
        raise UsageError(f"{what} must be a positive number, got {v!r}")
    return f


def _pair(v, what: str) -> tuple[float, float]:
    try:
        x, y = (float(c) for c in v)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a pair of numbers (x, y), got {v!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise UsageError(f"{what} must be finite, got {v!r}")
    return x, y
