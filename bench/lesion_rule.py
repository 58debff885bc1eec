"""Choose the lesion rule (where a lesion ends, which pieces are one lesion) on selection-part patients.

    wsi-vssm synth mpat --patients 10 --from-patches .../pcam/valid.tar --part select --valid-select 1000 --seed 0
    wsi-vssm evaluate mpat --patients mpat/patients.csv --model M --out mpat-eval
    python bench/lesion_rule.py --cohort mpat --eval mpat-eval --model M [--write]

The heatmaps do not depend on the rule, so each candidate re-measures the lesions of the saved heatmaps
(`outputs.lesions.find_lesions`, as `predict` does) and stages the patients. Candidates: the lesion extent
threshold (`cell`: seed cells only, or a calibrated probability such as 0.5) times the merge distance in cells.
It prints the quadratic-weighted kappa and the node categories of each, and keeps the highest kappa (ties: the
earlier candidate, i.e. the stricter rule). `--write` stores the kept rule in the model file's metadata
(`lesion_extent_threshold`, `lesion_merge_distance_cells`, `lesion_rule`); the weights are untouched.
Use selection-part patients only: the rule is then reported on held-back patients by `wsi-vssm evaluate`.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import warnings
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def node_categories(cohort: Path, eval_dir: Path, cell_t: float, extent: float, merge: float) -> dict[str, str]:
    from wsi_vssm.outputs.heatmap import read_heatmap_zarr
    from wsi_vssm.outputs.lesions import find_lesions, node_category

    out = {}
    for row in _rows(cohort / "reference.csv"):
        prob, _, _, attrs = read_heatmap_zarr(eval_dir / row["slide"] / "heatmap.ome.zarr")
        block = attrs["wsi_vssm"]
        lesions = find_lesions(prob, block["cell0"], tuple(block["origin"]), block["mpp"], cell_t, merge,
                               extent_threshold=min(extent, cell_t))
        out[row["slide"]] = node_category([les.diameter_mm for les in lesions])
    return out


def score(cohort: Path, categories: dict[str, str]) -> tuple[float, dict]:
    from wsi_vssm.outputs.staging import quadratic_kappa, read_patients_csv, stage_patients

    reference = {r["slide"]: r["category"] for r in _rows(cohort / "reference.csv")}
    patients = read_patients_csv(cohort / "patients.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = stage_patients({p: [reference[s] for s in nodes] for p, nodes in patients.items()})
        got = stage_patients({p: [categories[s] for s in nodes] for p, nodes in patients.items()})
    pairs: dict[str, int] = {}
    for s, ref in reference.items():
        key = f"{ref}->{categories[s]}"
        pairs[key] = pairs.get(key, 0) + 1
    return quadratic_kappa(list(want.values()), list(got.values())), dict(sorted(pairs.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/lesion_rule.py", description=__doc__.split("\n")[0])
    ap.add_argument("--cohort", type=Path, required=True, help="selection-part patients (reference.csv, patients.csv)")
    ap.add_argument("--eval", type=Path, required=True, help="`wsi-vssm evaluate` output of that cohort")
    ap.add_argument("--model", required=True, help="the model file that made the heatmaps")
    ap.add_argument("--extent", nargs="+", default=["cell", "0.5"], help="'cell' or probabilities")
    ap.add_argument("--merge", nargs="+", type=float, default=[1.0, 2.0], help="merge distances in cells")
    ap.add_argument("--write", action="store_true", help="store the kept rule in the model file's metadata")
    a = ap.parse_args(argv)

    import torch

    from wsi_vssm.atomic import atomic_write_bytes
    from wsi_vssm.models.slide_model import load_model, resolve_model_path
    from wsi_vssm.pipeline.predict import PredictParams, cell_threshold

    path = resolve_model_path(a.model)
    cell_t = cell_threshold(load_model(path), PredictParams(), warn=False)
    rows = []
    for ext, merge in itertools.product(a.extent, a.merge):
        extent = cell_t if ext == "cell" else float(ext)
        kappa, pairs = score(a.cohort, node_categories(a.cohort, a.eval, cell_t, extent, merge))
        rows.append({"extent": ext, "extent_threshold": min(extent, cell_t), "merge_distance_cells": merge,
                     "kappa": kappa, "nodes": pairs})
        print(f"extent {ext:>5}  merge {merge:g} cells: kappa {kappa:.3f}  "
              + ", ".join(f"{k} {v}" for k, v in pairs.items()), flush=True)
    best = max(rows, key=lambda r: r["kappa"])  # max keeps the first of equal kappas
    print(f"kept: extent {best['extent']} ({best['extent_threshold']:.4f}), merge {best['merge_distance_cells']:g} "
          f"cells, kappa {best['kappa']:.3f} on {a.cohort}")
    if a.write:
        ckpt = torch.load(path, weights_only=True)
        ckpt["metadata"].update(
            lesion_extent_threshold=best["extent_threshold"], lesion_merge_distance_cells=best["merge_distance_cells"],
            lesion_rule={"chosen_by": "python bench/lesion_rule.py", "cohort": str(a.cohort), "candidates": rows})
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        atomic_write_bytes(path, buf.getvalue())
        print(f"wrote the rule into {path}")
    print(json.dumps(best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
