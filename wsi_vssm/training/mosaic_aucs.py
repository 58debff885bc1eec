"""Slide AUCs of a mosaic_mil stage's heads, recomputed from its feature stores: the learned slide head's and
those of plain pooling of the cell head's logits (`python -m wsi_vssm.training.mosaic OUT/mosaic_mil MODEL`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def pooling_aucs(data, cell_head: dict) -> dict:
    """Slide AUCs of parameter-free pooling of the cell head's logits (max, mean of the top 5, share of cells
    above 0) over `data` (a `train_mil.Bags`): the baselines a learned slide head should beat."""
    from wsi_vssm.outputs.report import roc_auc_or_nan as roc_auc

    w = cell_head["weight"].float().numpy().reshape(-1)
    b = float(cell_head["bias"].float().numpy().reshape(-1)[0])
    scores: dict[str, list] = {"max": [], "top5_mean": [], "positive_share": []}
    labels = []
    for i in range(len(data)):
        f = np.asarray(data.features(i), dtype=np.float32)
        if not len(f):
            continue
        logit = f @ w + b
        scores["max"].append(float(logit.max()))
        scores["top5_mean"].append(float(np.sort(logit)[-5:].mean()))
        scores["positive_share"].append(float((logit > 0).mean()))
        labels.append(data.labels[i])
    return {k: roc_auc(labels, v) for k, v in scores.items()}


def main(argv=None) -> int:
    """`python -m wsi_vssm.training.mosaic OUT/mosaic_mil MODEL`: slide AUCs of the MIL head of MODEL and of plain
    pooling on the stage's train and valid feature stores (what the stage printed, recomputed)."""
    import argparse

    from wsi_vssm.errors import WsiVssmError, warn_in_one_line
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.outputs.report import roc_auc_or_nan as roc_auc
    from wsi_vssm.runs.cohort import read_cohort
    from wsi_vssm.training.mil import Bags

    ap = argparse.ArgumentParser(prog="python -m wsi_vssm.training.mosaic")
    ap.add_argument("stage_dir", type=Path, help="the mosaic_mil stage's folder (OUT/mosaic_mil)")
    ap.add_argument("model", help="model file (or 'default') whose backbone made the feature stores")
    a = ap.parse_args(argv)
    warn_in_one_line(ap.prog)
    parts = [(part, folder) for part, folder in (("train", "mosaics/train"), ("valid", "mosaics/valid"),
             ("synth_train", "synth/train"), ("synth_valid", "synth/valid")) if (a.stage_dir / folder).is_dir()]
    if not parts:  # a wrong folder printed nothing and exited 0
        ap.error(f"{a.stage_dir}: no mosaics/train or mosaics/valid folder: not a mosaic_mil stage's folder")
    try:  # bad input (a missing model file, a damaged store) is one line and exit 1, as on the command line
        model = load_model(a.model)
        head = model.mil.cell_head.state_dict()
        for part, folder in parts:
            rows = read_cohort(a.stage_dir / folder).rows
            bags = Bags([(a.stage_dir / "features" / part / f"{r.name}.zarr", r.label) for r in rows], 4096.0)
            probs = slide_probs(model.mil, bags)
            mil_auc = roc_auc(np.asarray(bags.labels)[ok := np.isfinite(probs)], probs[ok])
            pooled = pooling_aucs(bags, head)
            print(f"{part.replace('_', ' ')} {'slides' if part.startswith('synth') else 'mosaics'} (n={len(bags)}): "
                  f"MIL slide AUC {mil_auc:.4f}; pooling " + ", ".join(f"{k} {v:.4f}" for k, v in pooled.items()))
    except WsiVssmError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


def slide_probs(mil, bags) -> np.ndarray:
    """Slide probabilities of the MIL head over a `train_mil.Bags` (NaN for a slide without cells)."""
    from wsi_vssm.training.mil import bag_logits

    return 1.0 / (1.0 + np.exp(-bag_logits(mil, bags)))
