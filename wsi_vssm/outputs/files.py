"""The one list of output file names: per slide in `OUT/<slide name>/`, per cohort in `OUT/`.

Everything that writes, checks or reads outputs (predict, the cohort runner, evaluate, the napari plugin) takes
the names from here. Plain constants and standard library only: the napari reader imports it while sniffing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# per slide
PREDICTION_JSON = "prediction.json"  # written last: its presence means the slide's outputs are complete
HEATMAP_ZARR = "heatmap.ome.zarr"
OVERLAY_PNG = "overlay.png"
CONTOURS_GEOJSON = "contours.geojson"
LESIONS_CSV = "lesions.csv"
SLIDE_FILES = (PREDICTION_JSON, HEATMAP_ZARR, OVERLAY_PNG, CONTOURS_GEOJSON, LESIONS_CSV)
CELLS_GEOJSON = "cells.geojson"  # with --cells-geojson: every tissue cell as a QuPath tile
# Raised when the files made from a slide's heatmap change for the same heatmap: a cohort run then remakes a done
# slide's files from its saved heatmap (the package version does not change between commits of a checkout).
# 2 (2026-12-05): one contours.geojson feature per lesion. A run's state without it is format 1.
OUTPUTS_FORMAT = 2

# per cohort
PREDICTIONS_CSV = "predictions.csv"
METRICS_JSON = "metrics.json"
ROC_PNG = "roc.png"
CALIBRATION_PNG = "calibration.png"  # reliability diagram (outputs.calibration)
STAGES_CSV = "stages.csv"  # with --patients
CONFUSION_PNG = "confusion.png"  # with --patients: per-node categories, reference against predicted
FROC_PNG = "froc.png"  # with --annotations: the lesion-level FROC curve
ROC_SUBGROUPS_PNG = "roc_subgroups.png"  # with --subgroup: a ROC panel per column, a curve per group
# with --annotations: per scored slide `<slide>.csv`, the FROC's detections in CAMELYON16's submission format
FROC_DETECTIONS = "froc_detections"
COHORT_LESIONS_CSV = LESIONS_CSV  # every scored slide's lesions, with a `slide` column
MODEL_PATCHES_CSV = "model_patches.csv"  # a patch folder's patches that trained or selected the model
COHORT_FILES = (PREDICTIONS_CSV, METRICS_JSON, ROC_PNG, CALIBRATION_PNG, COHORT_LESIONS_CSV)
# the report figures, each also written as <stem>.pdf / .svg with `evaluate --vector` (atomic.vector_copies)
REPORT_FIGURES = (ROC_PNG, CALIBRATION_PNG, FROC_PNG, CONFUSION_PNG, ROC_SUBGROUPS_PNG)


def vector_copies_of(figure: str) -> tuple[str, ...]:
    """The names `evaluate --vector` gives a report figure's vector copies: `roc.png` -> roc.pdf, roc.svg."""
    stem = figure.rsplit(".", 1)[0]
    return (f"{stem}.pdf", f"{stem}.svg")  # atomic.VECTOR_FORMATS: files imports nothing of the package


VECTOR_COPIES = tuple(copy for figure in REPORT_FIGURES for copy in vector_copies_of(figure))

# The flag a zarr output (a heatmap, a feature store) carries when every chunk was written, empty ones too: zarr
# skips chunks equal to the fill value by default and reads an absent one as that fill, so only with the flag can
# a chunk lost in a copy be told from an empty one.
ALL_CHUNKS = "all_chunks_written"


def read_metrics(folder: str | os.PathLike) -> dict | None:
    """An evaluate report's metrics.json in `folder`, or None where there is none to read (missing, unreadable,
    not JSON, not an object): the one reader of the file for `compare`, `info` and a rerun."""
    try:
        metrics = json.loads((Path(folder) / METRICS_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def is_patch_report(metrics: dict | None) -> bool:
    """Whether a metrics.json is a patch folder's (`model_patches` is written by patch evaluations only)."""
    return bool(metrics) and "model_patches" in metrics


def missing_chunks(arr) -> int:
    """How many chunks of a zarr array are not on disk."""
    return arr.nchunks - arr.nchunks_initialized


def slide_outputs_ok(folder: str | os.PathLike) -> bool:
    """A cheap completeness check of one slide's output folder: prediction.json and the heatmap's metadata parse,
    and every other per-slide file exists."""
    folder = Path(folder)
    try:
        rec = json.loads((folder / PREDICTION_JSON).read_text(encoding="utf-8"))
        json.loads((folder / HEATMAP_ZARR / ".zattrs").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    others = (n for n in SLIDE_FILES if n not in (PREDICTION_JSON, HEATMAP_ZARR))
    return isinstance(rec, dict) and "probability" in rec and all((folder / n).is_file() for n in others)


def zarr_root_attrs(p: Path) -> dict | None:
    """The root attributes of a zarr v2 (.zattrs) or v3 (zarr.json) group; {} for a bare group, None if broken."""
    try:
        if (p / ".zattrs").is_file():
            return dict(json.loads((p / ".zattrs").read_text(encoding="utf-8")))
        if (p / "zarr.json").is_file():
            return dict(json.loads((p / "zarr.json").read_text(encoding="utf-8")).get("attributes") or {})
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return {}


def name_key(name: str) -> str:
    """How slide names are matched across tables, states and files: in any case and either Unicode form (macOS
    writes file names decomposed, NFD, while a typed table is composed, NFC: `tümör` looked the same and was "not
    found"). Here, in a standard-library module, so that `info OUT` matches names without loading numpy."""
    import unicodedata

    return unicodedata.normalize("NFC", name).lower()


def is_heatmap_zarr(p: Path) -> bool:
    """Whether folder `p` is a heatmap.ome.zarr written by `outputs.heatmap` (its `wsi_vssm` block, any name)."""
    block = (zarr_root_attrs(p) or {}).get("wsi_vssm")
    return isinstance(block, dict) and "cell_um" in block


# A text cell beginning with one of these is taken for a formula by Excel, LibreOffice and Google Sheets: a slide
# or patient named `=HYPERLINK(...)` or `=cmd|...` in a table a lab opens is a known attack (CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """`text` with a `'` before a formula-like start (OWASP's advice), so a spreadsheet shows it as text; a text
    that already starts with quotes before one gets one more, so that `from_spreadsheet_safe` undoes it exactly."""
    return f"'{text}" if _formula_like(text) else text


def from_spreadsheet_safe(text: str) -> str:
    """The text `spreadsheet_safe` was given (for tables this package reads back)."""
    return text[1:] if text.startswith("'") and _formula_like(text[1:]) else text


def _formula_like(text: str) -> bool:
    return text.startswith(FORMULA_STARTS) or (text.startswith("'") and _formula_like(text[1:]))


def is_detections_folder(path: Path) -> bool:
    """OUT/froc_detections as evaluate writes it, not the output folder of a slide of that name from a version
    before the name was reserved (which holds a prediction.json): only ours may be replaced or removed."""
    return path.is_dir() and not path.is_symlink() and not (path / PREDICTION_JSON).exists()
