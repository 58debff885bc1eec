"""What a prediction is run with: `PredictParams`, and the slide, cell and lesion thresholds resolved from them
and the model file (`--threshold`, `--cell-threshold`, ... else the model's, else the old defaults)."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from wsi_vssm.errors import UsageError, is_real_number

DEFAULT_THRESHOLD = 0.5


@dataclass
class PredictParams:
    mpp: float | None = None  # level-0 mpp of a slide that states none (overrides a stated one, with a warning)
    fallback_mpp: float | None = None  # level-0 mpp of a slide that stores none; a stated one is kept
    target_mpp: float | None = None  # analysis resolution; default: the model's own
    region_px: int | None = None  # default by device (pipeline.geometry.resolve_geometry)
    overlap_px: int | None = None  # default pipeline.geometry.DEFAULT_OVERLAP_PX
    device: str = "auto"
    batch_size: int = 1
    reader_threads: int = 2  # threads reading regions ahead of the model
    amp: bool = False  # the old spelling of precision="bf16"
    threshold: float | None = None  # slide decision threshold; default: the model's, else 0.5
    cell_threshold: float | None = None  # cells at or above it are tumour; default: the model's, else 0.5
    extent_threshold: float | None = None  # where lesions end (<= cell_threshold): the model's, else cell_threshold
    merge_distance_cells: float | None = None  # lesion pieces this many cells apart are one: the model's, else 1
    backend: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | auto (wsi_vssm.models.precision)
    tta: bool = False  # mean over the 8 flips and quarter turns of every region: 8x the backbone time
    cells_geojson: bool = False  # also cells.geojson: every tissue cell as a QuPath tile with its probability

    def __post_init__(self):
        """Values refused at once, naming the field: a threshold of NaN was taken, and an out-of-range cell
        threshold failed only after the backbone had run (hours on a CPU for a real slide)."""
        def bad(name, what):
            raise UsageError(f"PredictParams.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("mpp", "fallback_mpp", "target_mpp"):
            value = getattr(self, name)
            if value is not None and not (is_real_number(value) and math.isfinite(value) and value > 0):
                bad(name, "a positive number of microns per pixel")
        for name in ("threshold", "cell_threshold", "extent_threshold"):
            value = getattr(self, name)
            if value is not None and not (is_real_number(value) and 0 <= value <= 1):
                bad(name, "a probability in [0, 1]")
        value = self.merge_distance_cells
        if value is not None and not (is_real_number(value) and math.isfinite(value) and value >= 0):
            bad("merge_distance_cells", "a number of cells >= 0")
        for name in ("batch_size", "reader_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                bad(name, "an integer >= 1")
        if self.amp and self.precision == "fp32":  # the alias spelt out: prediction.json said "fp32" under --amp
            self.precision = "bf16"

    def to_dict(self) -> dict:
        return asdict(self)

    def inference(self):
        from wsi_vssm.pipeline.extract import Inference

        return Inference.of(Inference(self.precision, self.tta), self.amp)


def slide_threshold(model, params: PredictParams, warn: bool = True) -> float:
    """`--threshold`, else the model file's `slide_threshold` (`threshold` in older files), else 0.5."""
    if params.threshold is not None:
        return float(params.threshold)
    return model_thresholds(model, warn)[0]


def cell_threshold(model, params: PredictParams, warn: bool = True) -> float:
    """`--cell-threshold`, else the model file's `cell_threshold`, else 0.5."""
    if params.cell_threshold is not None:
        return float(params.cell_threshold)
    return model_thresholds(model, warn)[1]


def extent_threshold(model, params: PredictParams, cell_t: float) -> float:
    """Where lesions end (outputs.lesions, hysteresis): `--extent-threshold`, else the model file's
    `lesion_extent_threshold`, else the cell threshold (lesions of seed cells only, as before 2026-12-02).
    Never above the cell threshold: a model's extent above a lower `--cell-threshold` becomes that threshold;
    `--extent-threshold` above it is an OptionError."""
    if params.extent_threshold is not None:
        if params.extent_threshold > cell_t:
            from wsi_vssm.errors import OptionError

            raise OptionError(f"--extent-threshold {params.extent_threshold:g} is above the cell threshold "
                              f"{cell_t:g}: a lesion's extent must include its seed cells")
        return float(params.extent_threshold)
    meta = getattr(model, "metadata", None) or {}
    return min(float(meta.get("lesion_extent_threshold", cell_t)), cell_t)


def merge_distance_cells(model, params: PredictParams) -> float:
    """Lesion pieces at most this many cell widths apart (edge to edge) are one lesion (outputs.lesions):
    `--lesion-merge-cells`, else the model file's `lesion_merge_distance_cells`, else 1."""
    from wsi_vssm.outputs.lesions import DEFAULT_MERGE_DISTANCE_CELLS

    if params.merge_distance_cells is not None:
        return float(params.merge_distance_cells)
    meta = getattr(model, "metadata", None) or {}
    return float(meta.get("lesion_merge_distance_cells", DEFAULT_MERGE_DISTANCE_CELLS))


def model_thresholds(model, warn: bool = True) -> tuple[float, float]:
    """(slide, cell) thresholds a model file stores. Files made before they had names store the slide one as
    `threshold` and no cell one: their cell threshold is 0.5 and their probabilities are not calibrated (said once
    per process when `warn`, i.e. when a slide is scored with it)."""
    meta = getattr(model, "metadata", None) or {}
    slide = float(meta.get("slide_threshold", meta.get("threshold", DEFAULT_THRESHOLD)))
    if "cell_threshold" not in meta:
        if warn:
            _warn_uncalibrated(getattr(model, "name", "model"))
        return slide, DEFAULT_THRESHOLD
    return slide, float(meta["cell_threshold"])


_UNCALIBRATED_WARNED: set[str] = set()


def _warn_uncalibrated(name: str) -> None:
    if name not in _UNCALIBRATED_WARNED:
        _UNCALIBRATED_WARNED.add(name)
        warnings.warn(f"model {name!r} stores no calibrated cell threshold: cells are called at 0.5 and its "
                      "probabilities are not calibrated", stacklevel=4)


def threshold_origin(model, given: float | None, kind: str = "slide") -> dict:
    """Where a report's operating threshold came from (metrics.json `threshold_origin`): `source` is `option`
    (--threshold / --cell-threshold), `model` (the model file's `slide_threshold` / `cell_threshold`) or
    `default` (0.5: an older file stores none); `rule`, how the model's was chosen when its training record
    says so (None otherwise). `kind`: "slide" or "cell"."""
    if given is not None:
        return {"source": "option", "rule": "given on the command line"}
    meta = getattr(model, "metadata", None) or {}
    stored = meta.get("slide_threshold", meta.get("threshold")) if kind == "slide" else meta.get("cell_threshold")
    if stored is None:
        return {"source": "default", "rule": "0.5: the model file stores no threshold"}
    return {"source": "model", "rule": _recorded_rule(meta, kind, stored)}


def _recorded_rule(meta: dict, kind: str, stored) -> str | None:
    """The rule a training stage records with the threshold it chose, when it is the one the file stores."""
    stage = meta.get("mil_stage" if kind == "slide" else "dense_stage")
    if not isinstance(stage, dict) or stage.get("threshold" if kind == "slide" else "cell_threshold") != stored:
        return None
    if kind == "slide":
        where = "selection mosaics and pooled bags" if stage.get("pooled_bags") else "selection mosaics"
        return f"Youden's J (sensitivity + specificity) on the {where} (training.mosaic)"
    spec = stage.get("token_specificity")
    if not (is_real_number(spec) and 0 < spec < 1):
        return None
    return f"{100 * spec:g}% of the selection part's normal tokens below it (training.dense)"
