"""Whether a model's calls hold across region sizes: the CPU default (2048 px) against the GPU default (9,984)
or any other `--region-px`. A cell's features depend on where it lay in its region (docs/features.md), and the
default model's slide head was trained on features of the CPU defaults, so a GPU run feeds it other features.

    OMP_NUM_THREADS=2 python bench/region_consistency.py --cohort WORK/cohorts/select32 \
        [--regions 2048 9984] [--overlap 128] [--slides 20] [--model default] [--work DIR]

Each slide of the cohort folder (a `reference.csv` beside its slides, as `synth --from-patches` writes one; use
a selection cohort, the held-back ones are for reporting) goes through `predict_slide` (what `wsi-vssm
predict` runs) once per region size. Printed, for each size against the first: the median and largest change
of the slide probability, the slides whose call at the model's slide threshold flips, the median Pearson r of
the cell probabilities and the median Jaccard index of the cells at or above the cell threshold; and the slide
AUC at each size. Figures only, nothing is checked; nothing here chooses anything.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cohort", type=Path, required=True, help="a cohort folder with reference.csv")
    ap.add_argument("--regions", type=int, nargs="+", default=[2048, 9984])
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--slides", type=int, default=20, help="the first N tumour and N normal slides")
    ap.add_argument("--model", default="default")
    ap.add_argument("--work", type=Path, default=None, help="keep the outputs here (default: a temp dir)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # out-of-domain notes and the like: figures only here

    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.outputs.heatmap import read_heatmap_zarr
    from wsi_vssm.outputs.report import roc_auc
    from wsi_vssm.pipeline.predict import PredictParams, cell_threshold, predict_slide, slide_threshold

    model = load_model(args.model)
    cells_at, slides_at = cell_threshold(model, PredictParams()), slide_threshold(model, PredictParams())
    slides = _slides(args.cohort, args.slides)
    print(f"model {model.name}; {len(slides)} slides of {args.cohort}; regions {args.regions} px, overlap "
          f"{args.overlap} px; slide threshold {slides_at:.3f}, cell threshold {cells_at:.3f}", flush=True)
    probs = {r: [] for r in args.regions}
    rows = {r: [] for r in args.regions[1:]}  # (|dp|, flipped, Pearson r, Jaccard) per slide
    labels = []  # of the slides compared
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for path, label in slides:
            folders = {}
            for region in args.regions:
                params = PredictParams(device="cpu", region_px=region, overlap_px=args.overlap, reader_threads=1)
                rec = predict_slide(path, model, work / f"r{region}", params)
                probs[region].append(rec["probability"])
                folders[region] = work / f"r{region}" / rec["slide"]
            if any(probs[r][-1] is None for r in args.regions):  # no tissue found: nothing to compare
                print(f"  {path.name} ({label}): no probability (no tissue), left out", flush=True)
                for r in args.regions:
                    probs[r].pop()
                continue
            labels.append(label)
            grids = {r: read_heatmap_zarr(folder / "heatmap.ome.zarr")[0] for r, folder in folders.items()}
            ref = grids[args.regions[0]]
            for region in args.regions[1:]:
                g, p0, p1 = grids[region], probs[args.regions[0]][-1], probs[region][-1]
                ok = np.isfinite(ref) & np.isfinite(g)
                r = float(np.corrcoef(ref[ok], g[ok])[0, 1]) if ok.sum() > 1 else float("nan")
                a, b = ref[ok] >= cells_at, g[ok] >= cells_at
                jaccard = float((a & b).sum() / (a | b).sum()) if (a | b).any() else 1.0
                rows[region].append((abs(p1 - p0), (p0 >= slides_at) != (p1 >= slides_at), r, jaccard))
            shown = ", ".join(f"{r}: {probs[r][-1]:.3f}" for r in args.regions)
            print(f"  {path.stem} ({label}): probability {shown} [{time.perf_counter() - t0:.0f} s]", flush=True)

    print(f"\nagainst {args.regions[0]} px regions (medians over slides; largest slide-probability change)")
    print(f"{'regions':>8} {'med |dp|':>9} {'max |dp|':>9} {'flipped':>8} {'Pearson r':>10} {'Jaccard':>8}")
    for region, got in rows.items():
        dp, flipped, r, j = (np.array(v, float) for v in zip(*got, strict=True))
        print(f"{region:>8} {np.median(dp):9.3f} {dp.max():9.3f} {int(flipped.sum()):>8} {np.nanmedian(r):10.3f} "
              f"{np.median(j):8.3f}")
    print("slide AUC: " + ", ".join(f"{r} px {roc_auc(labels, probs[r]):.3f}" for r in args.regions))


def _slides(cohort: Path, n: int) -> list[tuple[Path, int]]:
    """The first `n` tumour and `n` normal slides of the cohort's reference.csv (slide, label)."""
    with open(cohort / "reference.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    picked = {0: [], 1: []}
    for row in rows:
        label = 1 if row["label"].strip().lower() in ("1", "tumor", "tumour") else 0
        found = sorted(cohort.glob(f"{row['slide']}.*"))
        if found and len(picked[label]) < n:
            picked[label].append((found[0], label))
    return picked[1] + picked[0]


if __name__ == "__main__":
    main()
