"""Regenerate docs/images/napari_predict.png: the napari plugin over a synthetic tumour slide.

    xvfb-run -a python docs/make_napari_screenshot.py                  # the packaged default model
    xvfb-run -a python docs/make_napari_screenshot.py --model my.pt    # another model file
    xvfb-run -a python docs/make_napari_screenshot.py --from-annotation

With a model, the Predict widget runs prediction on the slide exactly as a user would (click Predict, wait),
then the whole window is captured. `--from-annotation` needs no model: the heatmap and contours are made from
the slide's known lesion (probability 0.95 on it, 0.15 on other tissue) and opened with the plugin's reader,
which shows the placement and the colours but not a model's output; the caption in docs/napari.md says which.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "images" / "napari_predict.png"
SIZE, MPP, SEED = 4000, 0.5, 3


def make_slide(folder: Path):
    from shapely.geometry import Polygon

    from wsi_vssm.synth import write_slide

    path = folder / "synthetic_tumour.tif"
    lesions = write_slide(path, size=SIZE, mpp=MPP, seed=SEED, tumor=True)
    return path, [Polygon(p) for p in lesions]


def annotation_outputs(slide_path: Path, lesions, out_root: Path) -> Path:
    """A prediction folder whose heatmap comes from the known lesions (no model involved)."""
    from shapely.ops import unary_union

    from wsi_vssm.io import open_slide
    from wsi_vssm.io.annotations import rasterize
    from wsi_vssm.io.tissue import tissue_mask
    from wsi_vssm.outputs.contours import max_probability, tumour_contours, write_contours_geojson
    from wsi_vssm.outputs.heatmap import write_heatmap_zarr

    cell0 = 32 * 0.97 / MPP  # the default model's token cell, in level-0 px
    n = int(np.ceil(SIZE / cell0))
    with open_slide(slide_path) as slide:
        thumb = slide.thumbnail(1024)
    mask = tissue_mask(thumb)
    centres = ((np.arange(n) + 0.5) * cell0 * mask.shape[0] / SIZE).astype(int).clip(0, mask.shape[0] - 1)
    prob = np.where(mask[np.ix_(centres, centres)], 0.15, np.nan).astype(np.float32)
    prob[rasterize(unary_union(lesions), (n, n), downsample=cell0)] = 0.95
    out = out_root / slide_path.stem
    out.mkdir(parents=True, exist_ok=True)
    write_heatmap_zarr(out / "heatmap.ome.zarr", prob, cell0, (0.0, 0.0), MPP, attrs={"slide": slide_path.stem})
    polys = tumour_contours(prob, 0.5, cell0, (0.0, 0.0))
    write_contours_geojson(out / "contours.geojson", polys, max_probability(polys, prob, cell0, (0.0, 0.0)), MPP)
    return out


def ensure_plugin() -> None:
    """Register the manifest when the package was installed without its napari entry point (a dev checkout)."""
    import npe2

    pm = npe2.PluginManager.instance()
    if "wsi-vssm" not in pm:
        pm.register(npe2.PluginManifest.from_file(HERE.parent / "wsi_vssm" / "napari_plugin" / "napari.yaml"))


def wait_for(widget, app, timeout_s: float = 600) -> None:
    start = time.monotonic()
    while widget.worker is not None:
        app.processEvents()
        time.sleep(0.05)
        if time.monotonic() - start > timeout_s:
            raise SystemExit(f"prediction did not finish in {timeout_s:.0f} s")


def frame_tissue(viewer) -> None:
    """Fit the view to the heatmap's tissue cells (rather than the whole glass) and select the slide layer."""
    viewer.reset_view()
    heat = next(ly for ly in viewer.layers if ly.metadata.get("wsi_vssm", {}).get("kind") == "heatmap")
    rows, cols = np.nonzero(heat.data > 0)
    lo = np.asarray(heat.data_to_world((rows.min(), cols.min())))
    hi = np.asarray(heat.data_to_world((rows.max(), cols.max())))
    slide = viewer.layers[0]
    extent = np.asarray(slide.data_to_world(slide.data[0].shape[:2])) - np.asarray(slide.data_to_world((0, 0)))
    camera = getattr(viewer, "scene", viewer).camera  # napari >= 0.9 moved it to viewer.scene
    camera.center = tuple((lo + hi) / 2)
    camera.zoom *= 0.85 * float(np.min(extent / np.maximum(hi - lo, 1e-9)))
    viewer.layers.selection.active = slide


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help='"default" or a model file')
    ap.add_argument("--from-annotation", action="store_true", help="heatmap from the known lesion, no model")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from wsi_vssm.napari_plugin.widget import PredictWidget

    ensure_plugin()
    with tempfile.TemporaryDirectory(prefix="wsi-vssm-doc-") as tmp:
        tmp = Path(tmp)
        slide_path, lesions = make_slide(tmp)
        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(1400, 900)
        viewer.open(slide_path, plugin="wsi-vssm")
        widget = PredictWidget(viewer)
        viewer.window.add_dock_widget(widget, name="wsi-vssm", area="right")
        widget.out_edit.setText(str(tmp / "out"))
        app = QApplication.instance()
        if args.from_annotation:
            viewer.open(annotation_outputs(slide_path, lesions, tmp / "out"), plugin="wsi-vssm")
            widget.result_label.setText("heatmap from the lesion annotation (illustration, no model)")
        else:
            widget.model_combo.setEditText(args.model)
            widget.start()
            wait_for(widget, app)
            if widget.last_result is None:
                print(f"prediction failed: {widget.result_label.text()}", file=sys.stderr)
                return 1
        frame_tissue(viewer)
        for _ in range(20):
            app.processEvents()
            time.sleep(0.05)
        img = viewer.screenshot(canvas_only=False, flash=False)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(img).convert("RGB").save(args.out, optimize=True)
        viewer.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
