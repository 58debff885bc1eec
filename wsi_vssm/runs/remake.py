"""When a done slide's outputs are made again from its saved heatmap instead of predicted again.

A rerun that changes only what is drawn from the cell grid (thresholds, the output files' format) need not run
the backbone: `pipeline.relabel` remakes the files from prediction.json and heatmap.ome.zarr (seconds a slide
against minutes to hours). So does a run that asks for a cells.geojson a done slide lacks: the file is not in the
parameter hash (it adds a file and changes none), and once written it is kept, and remade with the others, by
every later run into the folder (`pipeline.predict.write_grid_outputs`), with the option or without.
"""

from __future__ import annotations

from pathlib import Path

from wsi_vssm.outputs.files import CELLS_GEOJSON, OUTPUTS_FORMAT, slide_outputs_ok
from wsi_vssm.runs.state import Status, input_changed

# resolved parameters a done slide's outputs are made again for from its saved heatmap, not predicted again
RELABEL_KEYS = ("threshold", "cell_threshold", "lesion_extent_threshold", "lesion_merge_distance_cells",
                "outputs_format")


def remake_reason(state: dict | None, job, task) -> str | None:
    """Why a done predict slide's outputs are remade from its heatmap (for the run's line), or None when they are
    not: the slide must differ from this run only in `RELABEL_KEYS`, or lack the cells.geojson this run asks
    for, with its file unchanged and its other outputs complete."""
    if not state or job.kind != "predict" or state.get("status") != Status.DONE:
        return None
    old, new = recorded_params(state), job.task_params(task)
    if not old or old.keys() != new.keys() or any(old[k] != new[k] for k in new if k not in RELABEL_KEYS):
        return None
    # a state without a fingerprint (older runs) is trusted as the runner trusts it, but only to add a file
    if input_changed(state.get("input"), task.path) if "input" in state else old != new:
        return None
    folder = Path(job.out) / task.name
    if not slide_outputs_ok(folder):
        return None
    if old == new:  # up to date but for cells.geojson (else the runner skipped it)
        wanted = job.params.cells_geojson and not (folder / CELLS_GEOJSON).is_file()
        return "cells.geojson is asked for" if wanted else None
    if old["outputs_format"] != OUTPUTS_FORMAT:
        return f"its output files are of an older format (outputs format {OUTPUTS_FORMAT} now)"
    return "only thresholds changed"


def recorded_params(state: dict) -> dict:
    """A done predict slide's recorded parameters; a state from before `outputs_format` was recorded is format 1."""
    old = state.get("params")
    return {"outputs_format": 1, **old} if isinstance(old, dict) else {}
