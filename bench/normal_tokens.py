"""The share of tissue cells at or above the cell threshold on normal slides, from `predict` output folders.

    python bench/normal_tokens.py --reference COHORT/reference.csv OUT [OUT ...]

For each OUT (one model's predictions of the cohort), every slide labelled normal in the reference table: its
heatmap's tissue cells (level 0, non-zero) and how many reach its prediction.json's `cell_threshold`. On a
normal slide every such cell is a false positive; the overlay paints them. Prints one line per slide and OUT,
and each OUT's total.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, type=Path, help="reference.csv: slide,label")
    ap.add_argument("outs", nargs="+", type=Path, help="predict output folders, one per model")
    args = ap.parse_args()

    from wsi_vssm.outputs.heatmap import read_heatmap_zarr

    with open(args.reference, newline="", encoding="utf-8") as f:
        normal = [r["slide"] for r in csv.DictReader(f) if r["label"].strip().lower() in ("normal", "0")]
    for out in args.outs:
        above_all = tissue_all = 0
        for slide in normal:
            prob = read_heatmap_zarr(out / slide / "heatmap.ome.zarr")[0]
            threshold = json.loads((out / slide / "prediction.json").read_text())["cell_threshold"]
            tissue, above = int((prob > 0).sum()), int((prob >= threshold).sum())
            above_all, tissue_all = above_all + above, tissue_all + tissue
            print(f"{out}: {slide}: {above} of {tissue} tissue cells >= cell threshold {threshold:.3f} "
                  f"({100 * above / max(tissue, 1):.2f}%), max {float(np.max(prob)):.3f}")
        print(f"{out}: {len(normal)} normal slides: {above_all} of {tissue_all} cells "
              f"({100 * above_all / max(tissue_all, 1):.2f}%)")


if __name__ == "__main__":
    main()
