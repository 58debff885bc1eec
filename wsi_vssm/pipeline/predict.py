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
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from wsi_vssm import __version__
from wsi_vssm.errors import UsageError, WsiVssmError
from wsi_vssm.io.base import SlideReader
from wsi_vssm.outputs import files
from wsi_vssm.outputs.calibration import patch_logits, patch_probabilities  # noqa: F401  (public here too)
from wsi_vssm.outputs.prediction import SCHEMA as PREDICTION_SCHEMA
from wsi_vssm.pipeline.params import (  # noqa: F401  (public here too)
    DEFAULT_THRESHOLD,
    PredictParams,
    cell_threshold,
    extent_threshold,
    merge_distance_cells,
    model_thresholds,
    slide_threshold,
)

THUMBNAIL_SIDE = 2048  # overlay resolution (the tissue mask has its own rule: io.tissue.slide_tissue)


class Cancelled(WsiVssmError):
    """Prediction was cancelled (the napari widget's Cancel button)."""


class NonFiniteOutput(WsiVssmError):
    """NaN or infinite features or probabilities: never written as if they were results."""


def predict_slide(
    slide_path: str | os.PathLike | SlideReader,
    model,
    out_root: str | os.PathLike,
    params: PredictParams | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    cancel: threading.Event | None = None,
    run_regions: Callable | None = None,
) -> dict:
    """Predict one slide with a SlideModel and write its output folder; returns the prediction.json record.

    `slide_path` is a slide file or OME-Zarr folder, or an open `SlideReader` (`open_slide`, or `ArraySlide` over
    an image in memory), used as it is and left open (its mpp is its own: `params.mpp` is refused with one).

    Raises SlideError subclasses for unreadable slides (MissingMpp asks for --mpp or --fallback-mpp), Cancelled
    when `cancel` is set. A slide without tissue is not an error: its probability is None with the reason.
    `run_regions(plan)`, when given, computes the regions' cells instead of this process (`extract_slide`'s hook:
    the cohort runner spreads a large slide's regions over a Dask cluster with it).
    """
    from wsi_vssm.io.tissue import slide_tissue
    from wsi_vssm.pipeline.domain import model_domain, slide_domain
    from wsi_vssm.pipeline.extract import extract_slide

    params = params or PredictParams()
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    stage = _Stage(progress, cancel)
    # before any pixel is read: an --extent-threshold above the cell threshold is refused here, not after the backbone
    extent_threshold(model, params, cell_threshold(model, params, warn=False))
    with _opened(slide_path, params) as slide, _modes_kept(model):
        where = slide_path if slide is not slide_path else slide.path or slide.name  # what messages name
        stage("read", 0, 1)
        slide.require_mpp()
        out_dir = Path(out_root) / slide.name
        problem = _unsafe_output_folder(out_root, slide.name) or output_folder_problem(out_root, slide.name)
        if problem:  # before the backbone: mkdir found a file there only
            raise UsageError(f"{where}: {problem}")  # after the whole slide had run ("File exists")
        t = time.perf_counter()
        tissue = slide_tissue(slide)  # the one tissue rule: info, extract and training use it too
        same = max(tissue.thumbnail.shape[:2]) >= THUMBNAIL_SIDE  # large slides: one read serves both
        thumb = tissue.thumbnail if same else slide.thumbnail(THUMBNAIL_SIDE)  # for the overlay
        mask, scale = tissue.mask, tissue.scale
        timings["tissue"] = time.perf_counter() - t

        t = time.perf_counter()
        with _cancel_between_blocks(model.backbone, cancel):
            cells = extract_slide(
                slide, model.backbone, mpp=params.target_mpp or model.mpp, token_px=model.token_px,
                region_px=params.region_px,
                overlap_px=params.overlap_px,
                batch_size=params.batch_size, workers=params.reader_threads, device=params.device,
                inference=params.inference(),
                progress=lambda done, total: stage("regions", done, total), tissue=(mask, scale),
                run_regions=run_regions,
            )
        timings["features"] = time.perf_counter() - t

        t = time.perf_counter()
        threshold, cell_t = slide_threshold(model, params), cell_threshold(model, params)  # warns for this slide
        extent_t = extent_threshold(model, params, cell_t)
        prob, slide_logit, cell_probs, reason = _score(model, cells, where, mask)
        identity = _identity(model)  # hashes the weights once per slide: the record and the domain both need it
        # the domain check's threshold holds for single views: under TTA it reads the untransformed one
        feats = cells.features if cells.view_features is None else cells.view_features
        domain = slide_domain(tissue.thumbnail, mask, feats if len(cells) else None,
                              model_domain(model, identity["weights_hash"]), cells.attrs["mpp"], model.mpp,
                              slide.mpp)
        if not domain["in_domain"]:
            warnings.warn(f"{where}: out of the model's domain, results are unreliable: "
                          f"{'; '.join(domain['domain_notes'])}", stacklevel=2)  # the verdict first: lines are cut
        timings["mil"] = time.perf_counter() - t

        t = time.perf_counter()
        stage("write", 0, 1)
        out_dir.mkdir(parents=True, exist_ok=True)
        label = None if prob is None else int(prob >= threshold)
        at_threshold = int((cell_probs >= cell_t).sum())
        few = _few_cells_warning(at_threshold, label, cell_t)
        if few:  # on the terminal too: the overlay and lesions of such a call show nothing to check it by
            warnings.warn(f"{where}: {few}", stacklevel=2)
        notes = ([] if domain["in_domain"] else [f"out of domain: {'; '.join(domain['domain_notes'])}"]) + \
            ([few] if few else [])
        record = {
            "schema": PREDICTION_SCHEMA,  # first, as in the file
            "slide": slide.name,
            "probability": prob,
            "slide_logit": slide_logit,
            "label": label,
            "threshold": threshold,  # v1 name of slide_threshold
            "slide_threshold": threshold,
            "cell_threshold": cell_t,
            "lesion_extent_threshold": extent_t,
            "lesion_merge_distance_cells": merge_distance_cells(model, params),
            "reason": reason,
            "in_domain": domain["in_domain"],
            "domain_notes": domain["domain_notes"],
            "domain_distance": domain["domain_distance"],
            "domain_threshold": domain["domain_threshold"],
            "device": _device_name(params.device),
            "model": model_record(model, identity),
            "mpp": {"slide": slide.mpp, "slide_source": slide.mpp_source, "analysis": cells.attrs["mpp"]},
            "summary": {"n_cells": len(cells), "cells_at_cell_threshold": at_threshold,
                        "tissue_area_mm2": _tissue_area_mm2(tissue, slide.mpp), "largest_lesion_mm": None,
                        "warnings": notes},
            "lesions": [],
            "parameters": {**params.to_dict(), "precision_used": _precision_used(params),
                           "region_px": cells.attrs["region_px"], "overlap_px": cells.attrs["overlap_px"]},
            "timings": timings,
            "version": __version__,
        }
        _write_outputs(out_dir, slide, thumb, cells, cell_probs, record, cell_t, params.cells_geojson)
        timings["write"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        from wsi_vssm.outputs.prediction import write_prediction_json

        write_prediction_json(out_dir / files.PREDICTION_JSON, record)  # last: its presence means the slide is done
        stage("done", 1, 1)
    return record


def _unsafe_output_folder(out_root: str | os.PathLike, name: str) -> str | None:
    """Why OUT/<name> would put a slide's outputs elsewhere: the name is no folder name of its own (`...tif` is
    named `..`: its outputs landed in OUT's parent) or a symbolic link is there. For library calls and the napari
    widget; the runner refuses such names in words of its own (a folder given for a slide, say)."""
    if name in ("", ".", "..") or "/" in name or os.sep in name:
        return f"its name {name!r} is no folder name of its own under {out_root}: rename the slide"
    return output_folder_link(out_root, name)


def output_folder_link(out_root: str | os.PathLike, name: str) -> str | None:
    """Why OUT/<name> cannot take a slide's outputs when it is a symbolic link: they would land wherever it
    points. None otherwise."""
    folder = Path(out_root) / name
    if folder.is_symlink():
        return (f"its output folder {folder} is a symbolic link (to {os.readlink(folder)}): outputs are not "
                "written through links; remove it")
    return None


def output_folder_problem(out_root: str | os.PathLike, name: str) -> str | None:
    """Why OUT/<name> cannot hold a slide's outputs: a file (or a link to one) is there. None when it is a folder
    or absent (a link to a folder is the runner's to refuse: `runs.runner._triage`)."""
    folder = Path(out_root) / name
    if folder.exists() and not folder.is_dir():
        return (f"its output folder {folder} is a file, not a folder: move the file away or write the outputs "
                "elsewhere (--out)")
    return None


@contextmanager
def _opened(slide, params: PredictParams):
    """A path opened with `params`' backend and mpp (closed after), or the caller's open reader as it is."""
    from wsi_vssm.io import open_slide

    if isinstance(slide, SlideReader):
        for name in ("mpp", "fallback_mpp"):
            if getattr(params, name) is not None:
                raise UsageError(f"{slide.path or slide.name}: PredictParams.{name} is for slides given by path; "
                                 "set an open slide's own (ArraySlide(image, mpp=...), open_slide(path, mpp=...))")
        yield slide
        return
    with open_slide(slide, backend=params.backend, mpp=params.mpp, fallback_mpp=params.fallback_mpp) as reader:
        yield reader


@contextmanager
def _modes_kept(model):
    """The caller's train/eval mode of every submodule, put back after the slide (extraction and scoring switch
    them to eval): a validation call inside a training loop left its model half in eval mode. A model all in eval
    mode (the CLI's, napari's) is left alone, so concurrent calls on it stay safe; concurrent calls on one model
    in train mode are not (each would restore the modes under the other)."""
    modes = [(m, m.training) for m in model.modules()] if hasattr(model, "modules") else []
    if not any(training for _, training in modes):
        modes = []
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def _cancel_between_blocks(backbone, cancel: threading.Event | None):
    """Honour `cancel` before each VSS block too, not only between regions: napari's Cancel waited for the region
    under way, seconds on a CPU and more for larger regions (`bench/cancel.py`). Only this thread's forward passes
    are stopped (a model all in eval mode may serve several calls at once)."""
    blocks = [b for stage in getattr(backbone, "layers", ()) for b in getattr(stage, "blocks", ())]
    if cancel is None or not blocks:
        yield
        return
    owner = threading.get_ident()

    def check(_module, _inputs):
        if cancel.is_set() and threading.get_ident() == owner:
            raise Cancelled("prediction cancelled")

    handles = [b.register_forward_pre_hook(check) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _score(model, cells, slide_path, mask) -> tuple[float | None, float | None, np.ndarray, str | None]:
    """(slide probability, slide logit, cell probabilities, reason when there is no probability) from the MIL
    head, on the device its weights are on (it is not moved: the caller's model keeps its place). The slide
    probability is the logit's logistic in float64 (`outputs.calibration.logistic`)."""
    import torch

    from wsi_vssm.outputs.calibration import logistic

    if len(cells) == 0:
        reason = no_cells_reason(cells.attrs, mask)
        warnings.warn(f"{slide_path}: {reason}; the slide gets no probability", stacklevel=3)
        return None, None, np.zeros(0, np.float32), reason
    with torch.inference_mode():
        mil = model.mil.eval()
        weight = next(mil.parameters(), None)
        device = "cpu" if weight is None else weight.device
        res = mil(torch.from_numpy(cells.features.astype(np.float32)).to(device))
    slide_logit = float(res.slide_logit[0])
    cell_probs = torch.sigmoid(res.cell_logits[0]).float().cpu().numpy()
    if not (math.isfinite(slide_logit) and np.isfinite(cell_probs).all()):
        raise NonFiniteOutput(f"{slide_path}: the model gave NaN/inf probabilities (model "
                              f"{model.name}: its weights or the slide's features are not finite)")
    return logistic(slide_logit), slide_logit, cell_probs, None


FEW_CELLS = 3  # a tumour call resting on fewer cells above the cell threshold than this is flagged
FEW_CELLS_NOTE = "the tumour call rests on"  # how that note begins (relabel replaces it, the overlay shows it)


def _few_cells_warning(n: int, label: int | None, cell_threshold: float) -> str | None:
    if label == 1 and n < FEW_CELLS:  # "check the heatmap" led nowhere at 0: the overlay then tints nothing
        what = ("no cell of the heatmap looks like tumour, so doubt the call (slides unlike the training data get "
                "such calls)" if n == 0 else "look at them (lesions.csv, the overlay's outlines) before trusting it")
        return f"{FEW_CELLS_NOTE} {n} cell(s) at or above the cell threshold {cell_threshold:.3g}; {what}"
    return None


def few_cells_of(record: dict) -> int | None:
    """How many cells a tumour call flagged by the few-cells note rests on, else None. Read from the summary's
    count; records written before it (2026-12-07) have only the note's text."""
    summary = record.get("summary") or {}
    n = summary.get("cells_at_cell_threshold")
    if isinstance(n, int) and not isinstance(n, bool):
        return n if record.get("label") == 1 and n < FEW_CELLS else None
    for note in summary.get("warnings") or []:
        if isinstance(note, str) and note.startswith(FEW_CELLS_NOTE):
            head = note[len(FEW_CELLS_NOTE):].split()
            return int(head[0]) if head and head[0].isdigit() else None
    return None


def model_record(model, identity: dict | None = None) -> dict:
    """prediction.json's `model` (and metrics.json's): name, resolution, token size, then `_identity`'s hashes
    and domain (pass `identity` when the caller has it, to spare hashing the weights again)."""
    return {"name": model.name, "mpp": model.mpp, "token_px": model.token_px, **(identity or _identity(model))}


def _identity(model) -> dict:
    from wsi_vssm.models.slide_model import model_identity

    ident = model_identity(model)
    return {"hash": ident["weights_hash"], **ident}  # `hash`: v1 name of weights_hash


def _precision_used(params: PredictParams) -> str:
    """What `precision` (and the old `amp`) came to on this device: `fp32` or `bf16` (`auto` resolved)."""
    import torch

    from wsi_vssm.models.device import resolve_device
    from wsi_vssm.models.precision import resolve_precision

    dtype = resolve_precision(params.inference().precision, resolve_device(params.device))
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def _device_name(device: str) -> str:
    """The device as used (`auto` resolved as extraction resolves it): `cpu`, or `cuda:N`."""
    from wsi_vssm.models.device import resolve_device

    dev = resolve_device(device)
    if dev == "cuda":
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return dev


def _tissue_area_mm2(tissue, slide_mpp: float) -> float:
    """Tissue area from the mask: its pixels times the area one mask pixel covers on the slide."""
    px_mm = tissue.scale * float(slide_mpp) / 1000.0
    return float(f"{float(tissue.mask.sum()) * px_mm * px_mm:.6g}")  # 6 significant digits: a speck keeps its size


def cell_grid(coords_px: np.ndarray, values: np.ndarray, cell0: float, dims: tuple[int, int]) -> np.ndarray:
    """Scatter per-cell values onto the slide's cell grid (rows, cols); NaN where no cell was computed."""
    rows, cols = math.ceil(dims[1] / cell0), math.ceil(dims[0] / cell0)
    grid = np.full((rows, cols), np.nan, np.float32)
    if len(values):
        j = np.clip(np.round(coords_px[:, 0] / cell0).astype(np.int64), 0, cols - 1)
        i = np.clip(np.round(coords_px[:, 1] / cell0).astype(np.int64), 0, rows - 1)
        grid[i, j] = values
    return grid


def _write_outputs(out_dir: Path, slide, thumb, cells, cell_probs, record, cell_threshold: float,
                   cells_geojson: bool) -> None:
    cell0 = float(cells.attrs["cell_px0"])
    grid = cell_grid(cells.coords_px, cell_probs, cell0, slide.dimensions)
    write_grid_outputs(out_dir, slide, thumb, grid, cell0, record, cell_threshold, cells_geojson)


def write_grid_outputs(out_dir: Path, slide, thumb, grid, cell0: float, record, cell_threshold: float,
                       cells_geojson: bool = False) -> None:
    """heatmap.ome.zarr, lesions.csv, contours.geojson and overlay.png from the cell grid (NaN: no tissue; origin
    at 0, 0), and cells.geojson when asked or when the folder has one (a run without the option, `evaluate` on a
    predicted folder say, would otherwise leave it stale or lose it); fills the record's `lesions`,
    `summary.largest_lesion_mm` and `parameters.cells_geojson` (prediction.json itself is written last, by the
    caller). `pipeline.relabel` calls it with a saved heatmap's grid."""
    from wsi_vssm.outputs.cell_tiles import write_cells_geojson
    from wsi_vssm.outputs.contours import group_by_lesion, max_probability, tumour_contours, write_contours_geojson
    from wsi_vssm.outputs.heatmap import write_heatmap_zarr
    from wsi_vssm.outputs.lesions import find_lesions_and_labels, lesion_ids_for_polygons, write_lesions_csv
    from wsi_vssm.outputs.overlay import overlay_png

    origin = (0.0, 0.0)
    attrs = {"slide": slide.name, "model": record["model"]["name"], "model_sha256": record["model"]["sha256"],
             "weights_hash": record["model"]["weights_hash"], "cell_threshold": cell_threshold,
             "lesion_extent_threshold": record["lesion_extent_threshold"],
             "lesion_merge_distance_cells": record["lesion_merge_distance_cells"]}
    write_heatmap_zarr(out_dir / files.HEATMAP_ZARR, grid, cell0, origin, slide.mpp, attrs=attrs)
    extent = record["lesion_extent_threshold"]
    lesions, labels = find_lesions_and_labels(grid, cell0, origin, slide.mpp, cell_threshold,
                                              record["lesion_merge_distance_cells"], extent_threshold=extent)
    write_lesions_csv(out_dir / files.LESIONS_CSV, lesions)
    record["lesions"] = [lesion.as_dict() for lesion in lesions]
    record["summary"]["largest_lesion_mm"] = lesions[0].diameter_mm if lesions else None
    polys = tumour_contours(np.where(labels > 0, grid, np.nan), extent, cell0, origin)  # the lesions' outlines
    category = {lesion.id: lesion.category for lesion in lesions}
    shapes, ids = group_by_lesion(polys, lesion_ids_for_polygons(polys, labels, cell0, origin))
    write_contours_geojson(out_dir / files.CONTOURS_GEOJSON, shapes, max_probability(shapes, grid, cell0, origin),
                           slide_mpp=slide.mpp, slide=slide.name, lesions=[(i, category.get(i, "")) for i in ids],
                           in_domain=record["in_domain"])
    record["parameters"]["cells_geojson"] = cells_geojson = bool(cells_geojson or
                                                                 (out_dir / files.CELLS_GEOJSON).is_file())
    if cells_geojson:
        about = {k: attrs[k] for k in ("slide", "model", "model_sha256", "weights_hash")}
        write_cells_geojson(out_dir / files.CELLS_GEOJSON, grid, cell0, origin, cell_threshold,
                            about={**about, "mpp": slide.mpp, "in_domain": record["in_domain"]})
    overlay_png(out_dir / files.OVERLAY_PNG, thumb, grid, cell0, origin, slide.dimensions,
                cell_threshold=cell_threshold, title=overlay_title(record), contours=polys,
                warning=overlay_warning(record), no_tissue_text=no_cells_stamp(record))


def no_cells_stamp(record: dict) -> str:
    """What the overlay writes across a slide without cells: its reason's head ("no tissue found"), but for a
    fluorescence slide, whose tissue the brightfield tissue finder cannot see, that it is not brightfield (a
    probe read "no tissue found" stamped over a slide full of DAPI nuclei)."""
    from wsi_vssm.pipeline.domain import FLUORESCENCE_NOTE

    stamp = (record.get("reason") or "").split(":")[0] or NO_TISSUE
    if stamp == NO_TISSUE and any(str(n).startswith(FLUORESCENCE_NOTE) for n in record.get("domain_notes") or []):
        return "fluorescence, not analysed"
    return stamp


def overlay_warning(record: dict) -> str | None:
    """The overlay's red line under the title: for a slide out of the model's domain, why, in the domain notes'
    words (the colours and outlines of such a slide look as confident as any); for a tumour call that rests on
    fewer than FEW_CELLS cells at the cell threshold, that note (the title read "probability 0.999 -> tumour"
    over a heatmap with nothing outlined, the skin sample's, with no word)."""
    lines = [n for n in (record.get("summary") or {}).get("warnings") or [] if n.startswith(FEW_CELLS_NOTE)]
    if record.get("in_domain") is False:
        lines.insert(0, "out of the model's domain, so colours and outlines mean nothing: "
                        + "; ".join(record["domain_notes"]))
    return "; ".join(lines) or None


def overlay_title(record: dict) -> str:
    """The overlay's one-line title: slide, probability, decision, thresholds and model (3 digits); a slide out of
    the model's domain says so next to its call, where a reader of the image looks first."""
    head = f"{record['slide']}  |  "
    if record.get("in_domain") is False:
        head += "OUT OF DOMAIN, unreliable  |  "
    tail = f"  |  cell threshold {record['cell_threshold']:.3f}  |  model {record['model']['name']}"
    if record["probability"] is None:
        return f"{head}no probability: {record['reason']}{tail}"
    decision = "tumour" if record["label"] else "normal"
    return (f"{head}probability {record['probability']:.3f} -> {decision} (slide threshold "
            f"{record['slide_threshold']:.3f}){tail}")


NO_TISSUE, SMALLER_THAN_A_CELL, TOO_LITTLE_TISSUE = ("no tissue found", "slide smaller than one cell",
                                                     "no cell has enough tissue")


def no_cells_reason(attrs: dict, mask: np.ndarray) -> str:
    """Why a slide has no cell to score: no tissue on its mask, a slide smaller than one cell, or tissue too
    sparse to fill any cell to the store's `min_tissue` (`info` counts tissue on the thumbnail, so it can report
    some where predict scores none)."""
    if not np.asarray(mask).any():
        return NO_TISSUE
    scale = attrs["mpp"] / attrs["slide_mpp"]  # level-0 px per analysis px
    w, h = (d / scale for d in attrs["dims"])
    if min(w, h) < attrs["token_px"] - 1e-9:  # as the cell grid counts whole cells (pipeline.extract)
        return (f"{SMALLER_THAN_A_CELL}: {w:.4g} x {h:.4g} px at {attrs['mpp']:.3g} um/px, a cell is "
                f"{attrs['token_px']} px")
    return (f"{TOO_LITTLE_TISSUE}: tissue on {100 * float(np.mean(mask)):.1f}% of the slide, a cell needs "
            f"{100 * attrs['min_tissue']:.0f}%")


class _Stage:
    """Reports progress and honours cancellation between regions, up to the writing: once the outputs are
    written (stage "done") the slide is done, and a late cancel no longer calls it cancelled."""

    def __init__(self, progress, cancel):
        self.progress, self.cancel = progress, cancel

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != "done" and self.cancel is not None and self.cancel.is_set():
            raise Cancelled("prediction cancelled")
        if self.progress is not None:
            self.progress(done, total, stage)
