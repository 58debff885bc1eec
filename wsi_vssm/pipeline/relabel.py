"""A slide's outputs made again at other thresholds, without running the backbone.

The thresholds decide nothing upstream of the cell probabilities: the slide threshold makes the call
(prediction.json's `label`, `threshold` / `slide_threshold`, the few-cells note, the overlay's title), and the
cell threshold, the lesion extent threshold and the merge distance make the lesions, the contours and the
heatmap's attributes from the saved cell grid. So when a cohort rerun changes nothing but these (the runner
compares the resolved parameters: `runs.runner`), each done slide's outputs are made again from its saved
prediction.json and heatmap (`predict.write_grid_outputs`, as a prediction writes them): the tissue mask and the
drawing are done again, the backbone is not. Predicting every slide again took 48.5 s against 2.7 s for a rerun
of 80 tiny slides in a probe (2026-12-04): hours on a real cohort.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from wsi_vssm.outputs import files


def relabel_slide(slide_path: str | os.PathLike, model, out_root: str | os.PathLike, params) -> dict:
    """Rewrite OUT/<slide>/'s outputs for `params`' thresholds and merge distance (each as `predict` resolves it)
    from the slide's saved prediction.json and heatmap; returns the new record. Its `timings` keep the
    prediction's, plus `relabel`."""
    from wsi_vssm.io.tissue import slide_tissue
    from wsi_vssm.outputs.heatmap import read_heatmap_zarr
    from wsi_vssm.outputs.prediction import write_prediction_json
    from wsi_vssm.pipeline.predict import (
        FEW_CELLS_NOTE,
        THUMBNAIL_SIDE,
        _few_cells_warning,
        _opened,
        _precision_used,
        cell_threshold,
        extent_threshold,
        merge_distance_cells,
        slide_threshold,
        write_grid_outputs,
    )

    t0 = time.perf_counter()
    with _opened(slide_path, params) as slide:
        out_dir = Path(out_root) / slide.name
        record = json.loads((out_dir / files.PREDICTION_JSON).read_text(encoding="utf-8"))
        prob, _, _, attrs = read_heatmap_zarr(out_dir / files.HEATMAP_ZARR)
        grid = np.where(prob > 0, prob, np.nan)  # the file keeps no NaN: 0 is "no tissue" (no cell scores exactly 0)
        threshold, cell_t = slide_threshold(model, params), cell_threshold(model, params)
        label = None if record["probability"] is None else int(record["probability"] >= threshold)
        at_threshold = int((grid[np.isfinite(grid)] >= cell_t).sum())
        few = _few_cells_warning(at_threshold, label, cell_t)
        if few:
            warnings.warn(f"{slide.path or slide.name}: {few}", stacklevel=2)
        old = record["parameters"]
        record.setdefault("slide_logit", None)  # written by versions before it was recorded: not known here
        record.update(label=label, threshold=threshold, slide_threshold=threshold, cell_threshold=cell_t,
                      lesion_extent_threshold=extent_threshold(model, params, cell_t),
                      lesion_merge_distance_cells=merge_distance_cells(model, params),
                      parameters={**params.to_dict(), "precision_used": _precision_used(params),
                                  "region_px": old["region_px"], "overlap_px": old["overlap_px"]})
        kept = [n for n in record["summary"]["warnings"] if not n.startswith(FEW_CELLS_NOTE)]
        record["summary"].update(warnings=kept + ([few] if few else []), cells_at_cell_threshold=at_threshold)
        tissue = slide_tissue(slide)
        thumb = (tissue.thumbnail if max(tissue.thumbnail.shape[:2]) >= THUMBNAIL_SIDE
                 else slide.thumbnail(THUMBNAIL_SIDE))  # as predict_slide chose it
        write_grid_outputs(out_dir, slide, thumb, grid, float(attrs["wsi_vssm"]["cell0"]), record, cell_t,
                           params.cells_geojson)
        record["timings"] = {**record["timings"], "relabel": time.perf_counter() - t0}
        write_prediction_json(out_dir / files.PREDICTION_JSON, record)  # last, as predict_slide writes it
    return record
