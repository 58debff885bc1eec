"""A slide's outputs called again at another slide threshold, without running the backbone.

The slide threshold decides only the call: prediction.json's `label`, `threshold` / `slide_threshold`, the
few-cells note under a tumour call, `parameters`, and the overlay's title. The probability, the heatmap, the
lesions and the contours do not depend on it. So when a cohort rerun changes nothing but `--threshold` (the
runner compares the resolved parameters: `runs.runner`), each done slide is relabelled from its saved
prediction.json and heatmap: the tissue mask and the overlay's drawing are done again, the backbone is not
(predicting every slide again took 48.5 s against 2.7 s for a rerun of 80 tiny slides in a probe, 2026-12-04;
hours on a real cohort).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from wsi_vssm.outputs import files

FEW_CELLS_NOTE = "the tumour call rests on"  # how `predict._few_cells_warning`'s note begins


def relabel_slide(slide_path: str | os.PathLike, model, out_root: str | os.PathLike, params) -> dict:
    """Rewrite OUT/<slide>/prediction.json and overlay.png for `params`' slide threshold (`predict.slide_threshold`)
    from the slide's saved outputs; returns the new record. Its `timings` keep the prediction's, plus `relabel`."""
    from wsi_vssm.io.tissue import slide_tissue
    from wsi_vssm.outputs.contours import tumour_contours
    from wsi_vssm.outputs.heatmap import read_heatmap_zarr
    from wsi_vssm.outputs.lesions import find_lesions_and_labels
    from wsi_vssm.outputs.overlay import overlay_png
    from wsi_vssm.outputs.prediction import write_prediction_json
    from wsi_vssm.pipeline.predict import (
        NO_TISSUE,
        THUMBNAIL_SIDE,
        _few_cells_warning,
        _opened,
        _precision_used,
        overlay_title,
        overlay_warning,
        slide_threshold,
    )

    t0 = time.perf_counter()
    with _opened(slide_path, params) as slide:
        out_dir = Path(out_root) / slide.name
        record = json.loads((out_dir / files.PREDICTION_JSON).read_text(encoding="utf-8"))
        prob, _, _, attrs = read_heatmap_zarr(out_dir / files.HEATMAP_ZARR)
        meta = attrs["wsi_vssm"]
        grid = np.where(prob > 0, prob, np.nan)  # the file keeps no NaN: 0 is "no tissue" (no cell scores exactly 0)
        threshold = slide_threshold(model, params)
        label = None if record["probability"] is None else int(record["probability"] >= threshold)
        cell_t = record["cell_threshold"]
        few = _few_cells_warning(grid[np.isfinite(grid)], label, cell_t)
        if few:
            warnings.warn(f"{slide.path or slide.name}: {few}", stacklevel=2)
        kept = [n for n in record["summary"]["warnings"] if not n.startswith(FEW_CELLS_NOTE)]
        old = record["parameters"]
        record.update(label=label, threshold=threshold, slide_threshold=threshold,
                      parameters={**params.to_dict(), "precision_used": _precision_used(params),
                                  "region_px": old["region_px"], "overlap_px": old["overlap_px"]})
        record["summary"]["warnings"] = kept + ([few] if few else [])
        cell0, origin = float(meta["cell0"]), tuple(meta["origin"])
        extent = record["lesion_extent_threshold"]
        _, labels = find_lesions_and_labels(grid, cell0, origin, slide.mpp, cell_t,
                                            record["lesion_merge_distance_cells"], extent_threshold=extent)
        polys = tumour_contours(np.where(labels > 0, grid, np.nan), extent, cell0, origin)
        tissue = slide_tissue(slide)
        thumb = (tissue.thumbnail if max(tissue.thumbnail.shape[:2]) >= THUMBNAIL_SIDE
                 else slide.thumbnail(THUMBNAIL_SIDE))  # as predict_slide chose it
        reason = record["reason"] or ""
        overlay_png(out_dir / files.OVERLAY_PNG, thumb, grid, cell0, origin, slide.dimensions,
                    cell_threshold=cell_t, title=overlay_title(record), contours=polys,
                    warning=overlay_warning(record), no_tissue_text=reason.split(":")[0] or NO_TISSUE)
        record["timings"] = {**record["timings"], "relabel": time.perf_counter() - t0}
        write_prediction_json(out_dir / files.PREDICTION_JSON, record)  # last, as predict_slide writes it
    return record
