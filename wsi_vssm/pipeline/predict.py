"""Prediction for one slide: cells -> cell and slide tumour probabilities -> the per-slide output folder.

`predict_slide` is what `wsi-vssm predict`, `wsi-vssm evaluate` and the napari widget call. It writes, into
`out_root/<slide name>/`: prediction.json, heatmap.ome.zarr, overlay.png and contours.geojson (see
docs/outputs.md). Label and macro images are never read.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from wsi_vssm import __version__
from wsi_vssm.errors import WsiVssmError
from wsi_vssm.outputs import files

THUMBNAIL_SIDE = 2048  # tissue mask and overlay resolution
DEFAULT_THRESHOLD = 0.5


class Cancelled(WsiVssmError):
    """Prediction was cancelled (the napari widget's Cancel button)."""


class NonFiniteOutput(WsiVssmError):
    """NaN or infinite features or probabilities: never written as if they were results."""


@dataclass
class PredictParams:
    mpp: float | None = None  # level-0 mpp of a slide that states none (overrides a stated one, with a warning)
    target_mpp: float | None = None  # analysis resolution; default: the model's own
    region_px: int | None = None  # default by device (pipeline.geometry.resolve_geometry)
    overlap_px: int | None = None  # default pipeline.geometry.DEFAULT_OVERLAP_PX
    device: str = "auto"
    batch_size: int = 1
    reader_threads: int = 2  # threads reading regions ahead of the model
    amp: bool = False
    threshold: float | None = None  # slide decision threshold; default: the model's, else 0.5
    cell_threshold: float = 0.5  # heatmap level outlined by contours.geojson
    backend: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


def slide_threshold(model, params: PredictParams) -> float:
    if params.threshold is not None:
        return float(params.threshold)
    meta = getattr(model, "metadata", None) or {}
    return float(meta.get("threshold", DEFAULT_THRESHOLD))


def stain_warning(thumb: np.ndarray, mask: np.ndarray) -> str | None:
    """A warning when the slide does not look like brightfield H&E (fluorescence or IHC), else None.

    Fluorescence: a dark background (most of the thumbnail is dark). IHC: much of the tissue is DAB brown
    (hue between orange and yellow) rather than H&E's pink-purple.
    """
    gray = thumb.astype(np.float32).mean(axis=2)
    if np.median(gray) < 100:
        return "slide looks like fluorescence (dark background), not brightfield H&E; results are unreliable"
    if mask.sum() < 50:
        return None
    px = thumb[mask].astype(np.float32) / 255.0
    mx, mn = px.max(axis=1), px.min(axis=1)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    r, g, b = px[:, 0], px[:, 1], px[:, 2]
    # DAB brown: red > green > blue with real saturation; H&E pink/purple has blue >= green.
    brown = (r > g) & (g > b) & (sat > 0.15) & ((g - b) > 0.6 * (r - g))
    if brown.mean() > 0.3:
        return f"slide looks like IHC (DAB brown in {brown.mean():.0%} of tissue), not H&E; results are unreliable"
    return None


def predict_slide(
    slide_path: str | os.PathLike,
    model,
    out_root: str | os.PathLike,
    params: PredictParams | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    cancel: threading.Event | None = None,
    run_regions: Callable | None = None,
) -> dict:
    """Predict one slide with a SlideModel and write its output folder; returns the prediction.json record.

    Raises SlideError subclasses for unreadable slides (MissingMpp asks for --mpp), Cancelled when `cancel` is
    set. A slide without tissue is not an error: its probability is None with the reason. `run_regions(plan)`,
    when given, computes the regions' cells instead of this process (`extract_slide`'s hook: the cohort runner
    spreads a large slide's regions over a Dask cluster with it).
    """
    import torch

    from wsi_vssm.io import open_slide
    from wsi_vssm.io.tissue import mask_side, tissue_mask
    from wsi_vssm.pipeline.extract import extract_slide

    params = params or PredictParams()
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    stage = _Stage(progress, cancel)
    with open_slide(slide_path, backend=params.backend, mpp=params.mpp) as slide:
        stage("read", 0, 1)
        slide.require_mpp()
        t = time.perf_counter()
        thumb = slide.thumbnail(THUMBNAIL_SIDE)  # for the overlay; the mask's thumbnail is derived from it
        small = _shrink(thumb, mask_side(slide, THUMBNAIL_SIDE))
        mask = tissue_mask(small)
        scale = max(slide.dimensions[0] / small.shape[1], slide.dimensions[1] / small.shape[0])
        warning = stain_warning(small, mask)
        if warning:
            warnings.warn(f"{slide_path}: {warning}", stacklevel=3)
        timings["tissue"] = time.perf_counter() - t

        t = time.perf_counter()
        cells = extract_slide(
            slide, model.backbone, mpp=params.target_mpp or model.mpp, token_px=model.token_px,
            region_px=params.region_px,
            overlap_px=params.overlap_px,
            batch_size=params.batch_size, workers=params.reader_threads, device=params.device, amp=params.amp,
            progress=lambda done, total: stage("regions", done, total), tissue=(mask, scale),
            run_regions=run_regions,
        )
        timings["features"] = time.perf_counter() - t

        t = time.perf_counter()
        threshold = slide_threshold(model, params)
        if len(cells) == 0:
            prob, cell_probs, reason = None, np.zeros(0, np.float32), "no tissue found"
            warnings.warn(f"{slide_path}: no tissue found; the slide gets no probability", stacklevel=3)
        else:
            with torch.inference_mode():
                mil = model.mil.to("cpu").eval()
                res = mil(torch.from_numpy(cells.features.astype(np.float32)))
            prob = float(torch.sigmoid(res.slide_logit)[0])
            cell_probs = torch.sigmoid(res.cell_logits[0]).numpy().astype(np.float32)
            if not (math.isfinite(prob) and np.isfinite(cell_probs).all()):
                raise NonFiniteOutput(f"{slide_path}: the model gave NaN/inf probabilities (model "
                                      f"{model.name}: its weights or the slide's features are not finite)")
            reason = None
        timings["mil"] = time.perf_counter() - t

        t = time.perf_counter()
        stage("write", 0, 1)
        out_dir = Path(out_root) / slide.name
        out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "slide": slide.name,
            "probability": prob,
            "label": None if prob is None else int(prob >= threshold),
            "threshold": threshold,
            "reason": reason,
            "model": {"name": model.name, "mpp": model.mpp, "token_px": model.token_px,
                      "hash": cells.attrs.get("model_hash")},
            "mpp": {"slide": slide.mpp, "slide_source": slide.mpp_source, "analysis": cells.attrs["mpp"]},
            "parameters": {**params.to_dict(), "region_px": cells.attrs["region_px"],
                           "overlap_px": cells.attrs["overlap_px"], "n_cells": len(cells),
                           "warning": warning},
            "timings": timings,
            "version": __version__,
        }
        _write_outputs(out_dir, slide, thumb, cells, cell_probs, record, params.cell_threshold)
        timings["write"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        from wsi_vssm.outputs.report import write_prediction_json

        write_prediction_json(out_dir / files.PREDICTION_JSON, record)  # last: its presence means the slide is done
        stage("done", 1, 1)
    return record


def _shrink(img: np.ndarray, max_side: int) -> np.ndarray:
    """`img` with its longer side at most `max_side` (as SlideReader.thumbnail would give), without a re-read."""
    from wsi_vssm.io.base import resize

    h, w = img.shape[:2]
    f = max_side / max(h, w)
    return img if f >= 1 else resize(img, max(1, round(w * f)), max(1, round(h * f)))


def cell_grid(coords_px: np.ndarray, values: np.ndarray, cell0: float, dims: tuple[int, int]) -> np.ndarray:
    """Scatter per-cell values onto the slide's cell grid (rows, cols); NaN where no cell was computed."""
    rows, cols = math.ceil(dims[1] / cell0), math.ceil(dims[0] / cell0)
    grid = np.full((rows, cols), np.nan, np.float32)
    if len(values):
        j = np.clip(np.round(coords_px[:, 0] / cell0).astype(np.int64), 0, cols - 1)
        i = np.clip(np.round(coords_px[:, 1] / cell0).astype(np.int64), 0, rows - 1)
        grid[i, j] = values
    return grid


def _write_outputs(out_dir: Path, slide, thumb, cells, cell_probs, record, cell_threshold: float) -> None:
    from wsi_vssm.outputs.contours import max_probability, tumour_contours, write_contours_geojson
    from wsi_vssm.outputs.heatmap import write_heatmap_zarr
    from wsi_vssm.outputs.overlay import overlay_png

    cell0 = float(cells.attrs["cell_px0"])
    grid = cell_grid(cells.coords_px, cell_probs, cell0, slide.dimensions)
    attrs = {"slide": slide.name, "model": record["model"]["name"], "threshold": cell_threshold}
    write_heatmap_zarr(out_dir / files.HEATMAP_ZARR, grid, cell0, (0.0, 0.0), slide.mpp, attrs=attrs)
    overlay_png(out_dir / files.OVERLAY_PNG, thumb, grid, cell0, (0.0, 0.0), slide.dimensions)
    polys = tumour_contours(grid, cell_threshold, cell0, (0.0, 0.0))
    write_contours_geojson(out_dir / files.CONTOURS_GEOJSON, polys, max_probability(polys, grid, cell0, (0.0, 0.0)),
                           slide_mpp=slide.mpp, slide=slide.name)


class _Stage:
    """Reports progress and honours cancellation between regions."""

    def __init__(self, progress, cancel):
        self.progress, self.cancel = progress, cancel

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("prediction cancelled")
        if self.progress is not None:
            self.progress(done, total, stage)
