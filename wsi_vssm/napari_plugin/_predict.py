"""The widget's work, without Qt: load a model (`load_model_cached`) and run `predict_slide` for one slide.

Runs on a worker thread; `progress(done, total, stage)` and `cancel` (a threading.Event) pass straight through
to `wsi_vssm.pipeline.predict.predict_slide`, which raises `Cancelled` between regions once `cancel` is set.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "default"
DEFAULT_OUT = Path.home() / "wsi-vssm-predictions"

@dataclass(frozen=True)
class PredictRequest:
    slide: str  # path of the slide file or OME-Zarr directory
    model: str = DEFAULT_MODEL  # "default" or a model file
    mpp: float | None = None  # level-0 microns per pixel for a slide that states none (or to override it)
    out_root: str = str(DEFAULT_OUT)
    tta: bool = False  # predict --tta: the 8 flips and quarter turns averaged (about 8x the time)
    device: str = "auto"  # predict --device


@dataclass(frozen=True)
class PredictResult:
    record: dict  # prediction.json
    out_dir: Path  # out_root/<slide name>/


def run_prediction(
    request: PredictRequest,
    progress: Callable[[int, int, str], None] | None = None,
    cancel: threading.Event | None = None,
) -> PredictResult:
    """Predict one slide; raises WsiVssmError subclasses (SlideError, ModelFileError, Cancelled...)."""
    from wsi_vssm.models.slide_model import load_model_cached
    from wsi_vssm.pipeline.predict import Cancelled, PredictParams, predict_slide

    if progress is not None:
        progress(0, 1, "loading model")
    model = load_model_cached(request.model)
    if cancel is not None and cancel.is_set():
        raise Cancelled("prediction cancelled")
    out_root = Path(os.path.expanduser(request.out_root))
    params = PredictParams(mpp=request.mpp, tta=request.tta, device=request.device)
    _warn_of_head_region(model, params)
    record = predict_slide(request.slide, model, out_root, params, progress, cancel)
    return PredictResult(record, out_root / str(record["slide"]))


def _warn_of_head_region(model, params) -> None:
    """The command line's warning when a slide head learnt on features of other regions than this run reads (the
    widget's device box can pick a GPU, whose default regions are larger): a notification through the worker."""
    import warnings

    from wsi_vssm.models.device import resolve_device
    from wsi_vssm.pipeline.geometry import head_region_warning, resolve_geometry

    region_px, overlap_px = resolve_geometry(resolve_device(params.device), model.token_px, params.region_px,
                                             params.overlap_px)
    if mismatch := head_region_warning(getattr(model, "metadata", None), region_px, overlap_px):
        warnings.warn(mismatch, stacklevel=2)


def summary(record: dict) -> str:
    """One line for the widget: the slide probability and decision, or why there is none; a slide out of the
    model's domain, or a tumour call on fewer than 3 cells, says so next to its call, as the CLI line does."""
    prob = record.get("probability")
    out = ", OUT OF DOMAIN (unreliable)" if record.get("in_domain") is False else ""
    if prob is None:
        return f"{record.get('slide')}: no probability ({record.get('reason') or 'unknown reason'}){out}"
    from wsi_vssm.pipeline.predict import few_cells_of
    from wsi_vssm.runs.jobs import few_cells_tag

    label = "tumour" if record.get("label") else "normal"
    label += few_cells_tag(few_cells_of(record))  # a call on almost no cells, as the CLI line says it
    threshold = record.get("slide_threshold", record.get("threshold"))
    shown = "?" if threshold is None else f"{float(threshold):.3f}"
    return f"{record.get('slide')}: tumour probability {prob:.3f} -> {label}{out} (slide threshold {shown})"
