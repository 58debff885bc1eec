"""When a done slide's outputs are made again from its saved heatmap instead of predicted again.

A rerun that changes only what is drawn from the cell grid (thresholds, the output files' format, whether
cells.geojson is written) need not run the backbone: `pipeline.relabel` remakes the files from prediction.json and
heatmap.ome.zarr (seconds a slide against minutes to hours).
"""

from __future__ import annotations

from pathlib import Path

from wsi_vssm.outputs.files import CELLS_GEOJSON, OUTPUTS_FORMAT, slide_outputs_ok
from wsi_vssm.runs.state import Status, input_changed

# resolved parameters a done slide's outputs are made again for from its saved heatmap, not predicted again
RELABEL_KEYS = ("threshold", "cell_threshold", "lesion_extent_threshold", "lesion_merge_distance_cells",
                "outputs_format", "cells_geojson")


def remake_reason(state: dict | None, job, task) -> str | None:
    """Why a done predict slide's outputs are remade from its heatmap (for the run's line), or None when they are
    not: the slide must differ from this run only in `RELABEL_KEYS`, with its file unchanged and its outputs
    complete (but for a cells.geojson this run asks for)."""
    if not state or job.kind != "predict" or state.get("status") != Status.DONE:
        return None
    old, new = recorded_params(state), _cells_off(job.task_params(task))
    if not old or "input" not in state or input_changed(state.get("input"), task.path):
        return None
    if old.keys() != new.keys() or any(old[k] != new[k] for k in new if k not in RELABEL_KEYS):
        return None
    folder = Path(job.out) / task.name
    if not slide_outputs_ok(folder):
        return None
    if old == new:  # up to date but for a lost cells.geojson (else the runner skipped it)
        return "its cells.geojson is missing" if new["cells_geojson"] and not (folder / CELLS_GEOJSON).is_file() \
            else None
    if old["outputs_format"] != OUTPUTS_FORMAT:
        return f"its output files are of an older format (outputs format {OUTPUTS_FORMAT} now)"
    if old["cells_geojson"] != new["cells_geojson"]:
        return "cells.geojson is asked for" if new["cells_geojson"] else "cells.geojson is no longer asked for"
    return "only thresholds changed"


def recorded_params(state: dict) -> dict:
    """A done predict slide's recorded parameters; a state from before `outputs_format` was recorded is format 1."""
    old = state.get("params")
    return _cells_off({"outputs_format": 1, **old}) if isinstance(old, dict) else {}


def _cells_off(params: dict) -> dict:
    """`cells_geojson` is hashed only when on (`jobs.predict_job`, so older runs keep their hash): False where
    absent."""
    return {"cells_geojson": False, **params}
