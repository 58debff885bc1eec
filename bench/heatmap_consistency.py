"""How far the default model's heatmap can be trusted cell by cell: the same slide turned, and where in a patch
the tumour cells light up.

    OMP_NUM_THREADS=2 python bench/heatmap_consistency.py --valid ../shared/data/pcam/valid.tar \
        [--slides 6] [--grid 16] [--seed 11] [--tta] [--model default] [--work DIR]

Builds `--slides` mosaic slides of `--grid` x `--grid` held-back PCam patches (the part of valid no stage chose
anything on; half of the slides with a lesion), written at the model's resolution so that a 96 px patch is
exactly 3 x 3 cells of 32 px and every turned copy keeps the cell grid. Each slide is written again under the 7
other flips and quarter turns (the same decoded pixels, JPEG-encoded once each, as the identity copy is) and
all 8 go through `predict_slide` (what `wsi-vssm predict` runs; `--tta` adds its test-time augmentation). The
heatmaps are turned back and compared with the identity copy's. Printed:

- per turn, over the slides: the median Pearson r of the cell probabilities, the median Jaccard index of the
  cells at or above the model's cell threshold, and the largest slide-probability change;
- over the identity copies' label-1 (tumour) patches, the mean cell probability and the share of cells at or
  above the cell threshold by the cell's place in its patch (centre, edge, corner); the same over label-0
  patches of normal slides. PCam labels only a patch's centre 32 px, and the model was trained on that label
  (docs/model_card.md), so this shows how much of a lesion the heatmap covers on mosaics.

Figures only, nothing is checked; nothing here chooses anything.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

VIEWS = {  # name -> (turn the image, turn a (rows, cols) grid of the turned image back)
    "identity": (lambda a: a, lambda g: g),
    "flip left-right": (lambda a: a[:, ::-1], lambda g: g[:, ::-1]),
    "flip up-down": (lambda a: a[::-1], lambda g: g[::-1]),
    "rotate 90": (lambda a: np.rot90(a, 1), lambda g: np.rot90(g, -1)),
    "rotate 180": (lambda a: np.rot90(a, 2), lambda g: np.rot90(g, 2)),
    "rotate 270": (lambda a: np.rot90(a, 3), lambda g: np.rot90(g, 1)),
    "transpose": (lambda a: a.swapaxes(0, 1), lambda g: g.swapaxes(0, 1)),
    "anti-transpose": (lambda a: np.rot90(a, 2).swapaxes(0, 1), lambda g: np.rot90(g.swapaxes(0, 1), 2)),
}
PATCH_CELLS = 3  # a 96 px PCam patch is 3 x 3 cells of 32 px at the model's resolution
PLACE = {(1, 1): "centre", **{rc: "edge" for rc in ((0, 1), (1, 0), (1, 2), (2, 1))},
         **{rc: "corner" for rc in ((0, 0), (0, 2), (2, 0), (2, 2))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--valid", required=True, help="PCam valid.tar (or folder)")
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--model", default="default")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="keep the slides and outputs here (default: a temp dir)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # out-of-domain notes and the like: figures only here

    from wsi_vssm.io import open_slide
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.outputs.heatmap import read_heatmap_zarr
    from wsi_vssm.pipeline.predict import PredictParams, cell_threshold, predict_slide
    from wsi_vssm.synth.mosaic import make_mosaic_cohort, write_image_slide
    from wsi_vssm.training.cells import TrainCellsConfig, split_valid
    from wsi_vssm.training.data.patches import load_patches

    model = load_model(args.model)
    threshold = cell_threshold(model, PredictParams())
    params = PredictParams(device="cpu", tta=args.tta, reader_threads=1)
    # the recipe's split (1,000 selection patches, seed 0), as bench/detector.py makes it
    _, holdout = split_valid(load_patches(args.valid), TrainCellsConfig(seed=0, valid_select=1000))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        slides = make_mosaic_cohort(work / "mosaics", holdout, args.slides, args.seed, args.grid, model.mpp,
                                    reuse=True)
        print(f"model {model.name}, cell threshold {threshold:.3f}, tta {args.tta}; {len(slides)} held-back "
              f"mosaics of {args.grid} x {args.grid} patches", flush=True)
        per_view: dict[str, list[tuple[float, float, float]]] = {v: [] for v in VIEWS if v != "identity"}
        places: dict[tuple[int, str], list[float]] = {}
        t0 = time.perf_counter()
        for s in slides:
            with open_slide(s.path) as slide:
                rgb = slide.read_region((0, 0), 0, slide.dimensions)
            grids, probs = {}, {}
            for view, (turn, back) in VIEWS.items():
                path = work / "views" / f"{s.name}-{view.replace(' ', '_')}.tif"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_image_slide(path, np.ascontiguousarray(turn(rgb)), model.mpp)
                rec = predict_slide(path, model, work / "out", params)
                grid = read_heatmap_zarr(work / "out" / path.stem / "heatmap.ome.zarr")[0]
                grids[view], probs[view] = back(grid), rec["probability"]
            ref = grids["identity"]
            for view in per_view:
                g = grids[view]
                r = float(np.corrcoef(ref.ravel(), g.ravel())[0, 1])
                a, b = ref >= threshold, g >= threshold
                jaccard = float((a & b).sum() / max(1, (a | b).sum()))
                per_view[view].append((r, jaccard, abs(probs[view] - probs["identity"])))
            _collect_places(places, ref, s)
            print(f"  {s.name} ({s.label}): probability {probs['identity']:.3f}, "
                  f"{int((ref >= threshold).sum())} cells at or above the cell threshold "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)

    print("\nturned copy against the identity copy (medians over slides; largest slide-probability change)")
    print(f"{'turn':<16} {'Pearson r':>9} {'Jaccard':>8} {'max |dp|':>9}")
    for view, rows in per_view.items():
        r, j, dp = np.array(rows).T
        print(f"{view:<16} {np.median(r):9.3f} {np.median(j):8.3f} {dp.max():9.3f}")
    print("\ncells by place in their 96 px patch (identity copies): mean probability, share >= cell threshold")
    for label, name in ((1, "label-1 patches (tumour slides)"), (0, "label-0 patches (normal slides)")):
        parts = [f"{place} {np.mean(v):.3f} / {np.mean(np.asarray(v) >= threshold):.1%}"
                 for (lab, place), v in sorted(places.items()) if lab == label]
        print(f"{name}: " + "; ".join(parts))


def _collect_places(places: dict, grid: np.ndarray, slide) -> None:
    """Cell probabilities of the slide's patches by the cell's place in its patch: label-1 patches (the lesion's)
    of tumour slides, and every tissue patch of normal slides."""
    cells = {tuple(c) for c in slide.lesion_cells} if slide.label == "tumor" else {
        (i, j) for i, row in enumerate(slide.patches) for j, name in enumerate(row) if name is not None}
    label = 1 if slide.label == "tumor" else 0
    for i, j in cells:
        block = grid[i * PATCH_CELLS:(i + 1) * PATCH_CELLS, j * PATCH_CELLS:(j + 1) * PATCH_CELLS]
        if block.shape != (PATCH_CELLS, PATCH_CELLS):
            continue
        for (r, c), place in PLACE.items():
            places.setdefault((label, place), []).append(float(block[r, c]))


if __name__ == "__main__":
    main()
