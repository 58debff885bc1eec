"""The detector issue's figures for one or more models, side by side, on the held-back part of PCam valid.

    python bench/detector.py --valid .../pcam/valid.tar --work runs/detector-eval \\
        --model old=runs/old-default.pt --model new=default

For each model it prints (all on data no stage chose anything on, except the 16/32/48 rows, which use
selection-part mosaics as the issue asks):
- patch AUC on the 1,961 held-back patches (2,000 less 39 that repeat a selection image; alone, centre
  token), their cell ECE (10 bins) and the balanced accuracy at the model's `cell_threshold` (each patch is a
  cell, as `wsi-vssm evaluate PATCHES` scores it);
  the same patches tiled 8 x 8: centre-token AUC, dense token AUC (label-1 centres against every token of
  label-0 patches), sensitivity at 99.5% token specificity, and the centre tokens' ECE;
- slide AUC (95% bootstrap CI) and slide ECE on mosaic slides of 32 x 32 held-back patches (`--slides`, patches
  reused under flips / quarter turns when the pool runs out), through `wsi-vssm evaluate`'s own code; the ECE
  with its bootstrap CI and the ECE a perfectly calibrated model would show with the same probabilities on as
  many slides (metrics.json's `calibration`), which tells miscalibration from small-cohort noise;
- the share of tissue tokens above `cell_threshold` on the normal slides of that cohort (from heatmap.ome.zarr);
- slide AUC on selection-part mosaics of 16 x 16, 32 x 32 and 48 x 48 patches (`--size-slides` each), and the
  drop from 16 to 48 with a bootstrap interval (both cohorts resampled);
- the real-size check: slide AUC on held-back mosaics of 64 x 64 patches (`--large-slides`, about 20,000 cells
  each, 3-4 times a 32 x 32 mosaic), and at every size the sensitivity and specificity at the model's
  `slide_threshold` and the median probability of the normal slides. A slide head that drifts with bag size
  shows it here first: its normal slides climb towards the threshold as they grow.
Cohorts are written once under WORK/cohorts (same seeds, same slides for every model); results go to
WORK/detector.json. Runs on CPU: about 50 minutes per model on 2 cores with the defaults (80 + 3 x 60 + 20
slides; the 64 x 64 cohort about 10 of them); a rerun for the same model file resumes every slide from its state
in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

SIZES = (16, 32, 48)
LARGE = 64  # the held-back real-size check's side, in patches


def build_cohorts(valid_src: str, work: Path, n_test: int, n_size: int, valid_select: int, seed: int,
                  n_large: int = 0) -> dict:
    from wsi_vssm.synth.mosaic import make_mosaic_cohort
    from wsi_vssm.training.cells import TrainCellsConfig, split_valid
    from wsi_vssm.training.data.patches import load_patches

    select, holdout = split_valid(load_patches(valid_src), TrainCellsConfig(seed=seed, valid_select=valid_select))
    plan = {"test32": (holdout, n_test, 32, 102)}
    plan.update({f"select{g}": (select, n_size, g, 120 + g) for g in SIZES})
    if n_large:
        plan[f"test{LARGE}"] = (holdout, n_large, LARGE, 200)
    folders = {}
    for name, (patches, n, grid, cohort_seed) in plan.items():
        folder = work / "cohorts" / name
        if not (folder / "reference.csv").exists():
            t = time.perf_counter()
            make_mosaic_cohort(folder, patches, n, cohort_seed, grid, reuse=True, prefix=f"{name}_")
            print(f"cohort {name}: {n} slides of {grid} x {grid} patches ({time.perf_counter() - t:.0f} s)",
                  flush=True)
        folders[name] = folder
    return {"folders": folders, "holdout": holdout}


def patch_figures(model, holdout) -> dict:
    from wsi_vssm.outputs.calibration import expected_calibration_error
    from wsi_vssm.outputs.report import roc_auc_or_nan
    from wsi_vssm.pipeline.predict import PredictParams, cell_threshold, patch_probabilities
    from wsi_vssm.training.dense_eval import (
        mosaic_token_logits,
        split_tokens,
        token_metrics,
    )
    from wsi_vssm.training.patch_eval import predict_patches

    p = patch_probabilities(predict_patches(model, holdout), model.metadata)  # as `evaluate PATCHES` scores them
    y = np.asarray(holdout.labels)
    t = cell_threshold(model, PredictParams(), warn=False)
    order, logits = mosaic_token_logits(model, holdout, 8)  # the same patches tiled 8 x 8: every token in context
    tokens = split_tokens(y[order], logits)
    centre = 1 / (1 + np.exp(-logits[:, 1, 1]))
    return {"patch_auc": roc_auc_or_nan(y, p), "cell_ece": expected_calibration_error(y, p), "cell_threshold": t,
            "patch_balanced_accuracy": 0.5 * (float((p[y == 1] >= t).mean()) + float((p[y == 0] < t).mean())),
            "n_patches": len(y), **{f"mosaic_{k}": v for k, v in token_metrics(tokens).items()},
            "mosaic_cell_ece": expected_calibration_error(y[order], centre)}


def cohort_figures(model, model_path: str, folder: Path, out: Path) -> dict:
    from wsi_vssm.outputs.heatmap import read_heatmap_zarr
    from wsi_vssm.pipeline.predict import PredictParams, cell_threshold
    from wsi_vssm.runs.evaluate import evaluate_cohort

    res = evaluate_cohort(folder, model, out, model_path=model_path, n_boot=2000)
    m = res.metrics
    rows = [r for r in res.rows if r.get("probability") is not None and r.get("label") is not None]
    t = cell_threshold(model, PredictParams(), warn=False)
    above, cells, normal_probs = 0, 0, []
    for r in rows:
        if int(r["label"]) == 0:
            prob = read_heatmap_zarr(out / r["slide"] / "heatmap.ome.zarr")[0]
            n = json.loads((out / r["slide"] / "prediction.json").read_text())["summary"]["n_cells"]
            above, cells = above + int((prob >= t).sum()), cells + int(n)
            normal_probs.append(float(r["probability"]))
    return {"n": m["n"], "auc": m["auc"], "auc_ci95": m["auc_ci95"], "sensitivity": m["sensitivity"],
            "specificity": m["specificity"], "slide_threshold": m["threshold"],
            "slide_ece": m["calibration"]["ece"], "slide_ece_ci95": m["calibration"]["ece_ci95"],
            "slide_ece_if_calibrated": m["calibration"]["ece_if_calibrated"],
            "normal_token_share_above_cell_threshold": above / cells if cells else float("nan"),
            "normal_median_probability": float(np.median(normal_probs)) if normal_probs else float("nan"),
            "auc_ranked_by": m["auc_ranked_by"],  # the rows' logits, as `evaluate` ranks them (2026-12-06 on)
            "scores": [[int(r["label"]), float(r["logit"] if m["auc_ranked_by"] == "logit" else r["probability"])]
                       for r in rows]}


def drop_ci(a: list, b: list, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of AUC(a) - AUC(b) for two independent cohorts of [label, score] rows, each
    resampled within its classes (as `evaluate` resamples one cohort), each class's scores sorted first so that
    the interval does not depend on the order of the rows (figures before 2026-12-04 were drawn unsorted)."""
    from wsi_vssm.outputs.report import roc_auc

    rng = np.random.default_rng(seed)
    parts = [(np.asarray(c, dtype=np.float64)[:, 0] == 1, np.asarray(c, dtype=np.float64)[:, 1]) for c in (a, b)]
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        aucs = []
        for y, p in parts:
            pos = rng.choice(np.sort(p[y]), y.sum())
            neg = rng.choice(np.sort(p[~y]), (~y).sum())
            aucs.append(roc_auc(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))
        diffs[i] = aucs[0] - aucs[1]
    return [float(v) for v in np.quantile(diffs, [0.025, 0.975])]


def evaluate_model(name: str, path: str, cohorts: dict, work: Path, only: list[str] | None = None) -> dict:
    from wsi_vssm.models.slide_model import load_model

    model = load_model(path)
    t = time.perf_counter()
    out = {"model": path, **patch_figures(model, cohorts["holdout"])}
    for cohort, folder in cohorts["folders"].items():
        if only and cohort not in only:
            continue
        out[cohort] = cohort_figures(model, path, folder, work / "eval" / name / cohort)
        print(f"{name}: {cohort} slide AUC {out[cohort]['auc']:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    if "select16" in out and "select48" in out:
        out["drop_16_to_48"] = out["select16"]["auc"] - out["select48"]["auc"]
        out["drop_16_to_48_ci95"] = drop_ci(out["select16"]["scores"], out["select48"]["scores"])
    out["seconds"] = round(time.perf_counter() - t, 1)
    return out


SIZE_COHORTS = (*(f"select{g}" for g in SIZES), f"test{LARGE}")


def _at_size(r: dict, cohort: str, key: str) -> str:
    """One cohort's figure for the by-size rows; '-' where the model was not scored on that cohort."""
    value = (r.get(cohort) or {}).get(key)
    return "-" if value is None else f"{value:.2f}"


def print_table(results: dict) -> None:
    names = list(results)
    rows = [
        ("patch AUC, held-back valid", lambda r: f"{r['patch_auc']:.4f}"),
        ("  in 8 x 8 mosaics: centre-token AUC", lambda r: f"{r['mosaic_centre_auc']:.4f}"),
        ("  in 8 x 8 mosaics: dense token AUC (every normal token)", lambda r: f"{r['mosaic_dense_auc']:.4f}"),
        ("  in 8 x 8 mosaics: sensitivity at 99.5% token specificity",
         lambda r: f"{r['mosaic_sensitivity_at_0.995']:.3f}"),
        ("slide AUC, 32 x 32 held-back mosaics [95% CI]",
         lambda r: f"{r['test32']['auc']:.3f} [{r['test32']['auc_ci95'][0]:.3f}, {r['test32']['auc_ci95'][1]:.3f}]"
                   f" n={r['test32']['n']}"),
        ("  sensitivity / specificity at slide_threshold",
         lambda r: f"{r['test32']['sensitivity']:.3f} / {r['test32']['specificity']:.3f} "
                   f"(t={r['test32']['slide_threshold']:.3f})"),
        ("normal-slide tokens above cell_threshold",
         lambda r: f"{100 * r['test32']['normal_token_share_above_cell_threshold']:.2f}% "
                   f"(t={r['cell_threshold']:.3f})"),
        *[(f"slide AUC, {g} x {g} selection mosaics", lambda r, g=g: f"{r[f'select{g}']['auc']:.3f} "
           f"n={r[f'select{g}']['n']}") for g in SIZES],
        ("AUC drop, 16 x 16 -> 48 x 48 [95% CI]", lambda r: f"{r['drop_16_to_48']:+.3f} "
         f"[{r['drop_16_to_48_ci95'][0]:+.3f}, {r['drop_16_to_48_ci95'][1]:+.3f}]"),
        (f"slide AUC, {LARGE} x {LARGE} held-back mosaics [95% CI]",
         lambda r: f"{r[f'test{LARGE}']['auc']:.3f} [{r[f'test{LARGE}']['auc_ci95'][0]:.3f}, "
                   f"{r[f'test{LARGE}']['auc_ci95'][1]:.3f}] n={r[f'test{LARGE}']['n']}"),
        ("sensitivity / specificity at slide_threshold, 16 / 32 / 48 sel., 64 held-back",
         lambda r: " ; ".join(_at_size(r, c, "sensitivity") + "/" + _at_size(r, c, "specificity")
                              for c in SIZE_COHORTS)),
        ("normal slides' median probability, 16 / 32 / 48 sel., 64 held-back",
         lambda r: " / ".join(_at_size(r, c, "normal_median_probability") for c in SIZE_COHORTS)),
        ("slide ECE, 32 x 32 held-back mosaics [95% CI]",
         lambda r: f"{r['test32']['slide_ece']:.3f} [{r['test32']['slide_ece_ci95'][0]:.3f}, "
                   f"{r['test32']['slide_ece_ci95'][1]:.3f}]"),
        ("  the same probabilities, perfectly calibrated: ECE median [90% range]",
         lambda r: f"{r['test32']['slide_ece_if_calibrated']['median']:.3f} "
                   f"[{r['test32']['slide_ece_if_calibrated']['range90'][0]:.3f}, "
                   f"{r['test32']['slide_ece_if_calibrated']['range90'][1]:.3f}]"),
        ("cell ECE, held-back patches alone", lambda r: f"{r['cell_ece']:.3f}"),
        ("cell ECE, held-back patches in 8 x 8 mosaics (centre tokens)", lambda r: f"{r['mosaic_cell_ece']:.3f}"),
        ("balanced accuracy at cell_threshold, held-back patches", lambda r: f"{r['patch_balanced_accuracy']:.3f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print("| measure".ljust(width + 2) + " | " + " | ".join(names) + " |")
    def cell(fmt, r):
        try:
            return fmt(r)
        except (KeyError, TypeError):  # a cohort this model was not scored on (--only), or a null figure
            return "-"

    for label, fmt in rows:
        print(f"| {label.ljust(width)} | " + " | ".join(cell(fmt, results[n]) for n in names) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/detector.py", description=__doc__.split("\n")[0])
    ap.add_argument("--valid", required=True, help="PCam valid split (folder or tar)")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                    help="a model to score (repeatable); PATH may be 'default'")
    ap.add_argument("--work", type=Path, default=Path("runs/detector-eval"))
    ap.add_argument("--slides", type=int, default=80, help="held-back 32 x 32 mosaic slides (half tumour)")
    ap.add_argument("--size-slides", type=int, default=60,
                    help="selection mosaics per side 16 / 32 / 48 (60: with 24, the drop's noise was about +-0.1)")
    ap.add_argument("--large-slides", type=int, default=20,
                    help=f"held-back {LARGE} x {LARGE} mosaics, the real-size check (0: none)")
    ap.add_argument("--valid-select", type=int, default=1000, help="as in training: patches that select")
    ap.add_argument("--seed", type=int, default=0, help="the select / held-back split's seed, as in training")
    ap.add_argument("--only", nargs="+", default=None, metavar="COHORT",
                    help=f"score only these cohorts (test32, select16, select32, select48, test{LARGE}); the patch "
                         "rows always")
    ap.add_argument("--merge", action="store_true",
                    help="keep the results of models already in WORK/detector.json (score only the ones given)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    cohorts = build_cohorts(a.valid, a.work, a.slides, a.size_slides, a.valid_select, a.seed, a.large_slides)
    saved = a.work / "detector.json"
    results = json.loads(saved.read_text()) if a.merge and saved.exists() else {}
    for spec in a.model:
        name, _, path = spec.partition("=")
        results[name] = evaluate_model(name, path or name, cohorts, a.work, a.only)
        from wsi_vssm.atomic import atomic_write_json

        atomic_write_json(a.work / "detector.json", results)
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
