"""Outputs of `predict` and `evaluate`: heatmap pyramid, overlay, contours, cohort report and FROC.

Per slide, in `OUT/<slide name>/`: `prediction.json`, `heatmap.ome.zarr` (`heatmap`), `overlay.png` (`overlay`),
`contours.geojson` (`contours`). Per cohort: `metrics.json`, `predictions.csv`, `roc.png` (`report`),
`calibration.png` and metrics.json's `calibration` block (`calibration`), and the lesion-level FROC with
annotations (`froc`). Every writer is atomic (`wsi_vssm.atomic`). See docs/outputs.md.

Submodules import matplotlib, zarr and scipy only when used; import them directly, e.g.
`from wsi_vssm.outputs.heatmap import write_heatmap_zarr`.
"""
