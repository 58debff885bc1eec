"""Two models on one cohort, slide by slide: the paired DeLong test of their AUCs and a paired bootstrap of the
difference (`wsi-vssm compare`). Both curves are drawn from the same slides, so their AUCs are correlated, and
an unpaired comparison of two intervals would be far too conservative.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist

import numpy as np

from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.files import PREDICTIONS_CSV, is_patch_report, read_metrics
from wsi_vssm.outputs.report import _check, delong_placements, read_predictions_csv, resampled_aucs


def paired_delong(labels: Sequence[int], scores_a: Sequence[float], scores_b: Sequence[float],
                  alpha: float = 0.05) -> dict:
    """DeLong, DeLong and Clarke-Pearson (1988): the AUCs of two scores of the same items, their difference
    (A - B), its standard error from the placement values' covariance, the (1 - alpha) interval of the
    difference, z and the two-sided p-value. `se`, `ci95`, `z` and `p` are None where the difference has no
    variance to measure (the two scores order the items alike, or a class has fewer than 2 items)."""
    y, a = _check(labels, scores_a)
    b = _check(labels, scores_b)[1]
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m == 0 or n == 0:
        raise UsageError(f"comparing AUCs needs both classes; got {m} tumour and {n} normal items")
    va10, va01 = delong_placements(a[pos], a[neg])
    vb10, vb01 = delong_placements(b[pos], b[neg])
    auc_a, auc_b = float(va10.mean()), float(vb10.mean())
    out = {"auc_a": auc_a, "auc_b": auc_b, "difference": auc_a - auc_b, "se": None, "ci95": None, "z": None,
           "p": None}
    if m < 2 or n < 2:
        return out
    # the variance of (A - B) from the 2 x 2 covariances of the placements over positives and over negatives
    variance = float(np.var(va10 - vb10, ddof=1) / m + np.var(va01 - vb01, ddof=1) / n)
    if variance <= 1e-15:
        return out
    se = math.sqrt(variance)
    z = (auc_a - auc_b) / se
    half = NormalDist().inv_cdf(1 - alpha / 2) * se
    out.update(se=se, ci95=[auc_a - auc_b - half, auc_a - auc_b + half], z=z,
               p=min(1.0, 2 * NormalDist().cdf(-abs(z))))
    return out


def paired_bootstrap_difference(labels: Sequence[int], scores_a: Sequence[float], scores_b: Sequence[float],
                                n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> list[float]:
    """Percentile (1 - alpha) interval of AUC(A) - AUC(B) over `n_boot` stratified resamples of the items, the same
    items for both scores (positives and negatives resampled separately, as `bootstrap_auc_ci` does)."""
    y, a = _check(labels, scores_a)
    b = _check(labels, scores_b)[1]
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise UsageError(f"n_boot must be a positive integer, got {n_boot!r}")
    order = np.lexsort((b, a))  # a fixed order of the items: the interval cannot depend on the rows' order
    y, a, b = y[order], a[order], b[order]
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if pos.size == 0 or neg.size == 0:
        raise UsageError(f"comparing AUCs needs both classes; got {pos.size} tumour and {neg.size} normal items")
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    batch = max(1, 1_000_000 // y.size)  # bound memory on large cohorts
    for start in range(0, n_boot, batch):
        k = min(batch, n_boot - start)
        p_idx = rng.integers(0, pos.size, size=(k, pos.size))  # the same items drawn for both runs
        n_idx = rng.integers(0, neg.size, size=(k, neg.size))
        diffs[start : start + k] = (resampled_aucs(a[pos], a[neg], p_idx, n_idx)
                                    - resampled_aucs(b[pos], b[neg], p_idx, n_idx))
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    return [float(low), float(high)]


def compare_runs(out_a: str | os.PathLike, out_b: str | os.PathLike, n_boot: int = 2000) -> dict:
    """Compare two `evaluate` output folders over the items both scored (joined by name): each run's AUC, the
    paired DeLong test and the paired bootstrap interval of the difference. Each run is ranked as its own
    metrics.json was (by logit when every compared item has one). Raises UsageError when the folders cannot be
    compared: a table missing, a label that differs, fewer than 2 items of a class scored by both."""
    runs = [_read_run(Path(p)) for p in (out_a, out_b)]
    (rows_a, meta_a), (rows_b, meta_b) = runs
    common = sorted(set(rows_a) & set(rows_b))
    for name in common:
        if rows_a[name]["label"] != rows_b[name]["label"]:
            raise UsageError(f"{name}: labelled {rows_a[name]['label']} in {out_a} but {rows_b[name]['label']} in "
                             f"{out_b}: the runs are not of one cohort")
    labels = np.array([rows_a[s]["label"] for s in common], dtype=np.int64)
    m, n = int(labels.sum()), int(labels.size - labels.sum())
    if m < 2 or n < 2:
        raise UsageError(f"{out_a} and {out_b} have {m} tumour and {n} normal item(s) scored in both; comparing "
                         "their AUCs needs at least 2 of each")
    ranked = [_ranking(rows, common) for rows in (rows_a, rows_b)]
    test = paired_delong(labels, ranked[0][0], ranked[1][0])
    return {
        "runs": [_describe(p, meta, rows, common, by) for p, (rows, meta), (_, by) in
                 zip((out_a, out_b), runs, ranked, strict=True)],
        "differences": _differences(meta_a, meta_b) if meta_a and meta_b else {},
        "item_kind": "patches" if is_patch_report(meta_a) or is_patch_report(meta_b) else "slides",
        "n": int(labels.size), "n_tumour": m, "n_normal": n, "items": common,
        **test, "ci95_bootstrap": paired_bootstrap_difference(labels, ranked[0][0], ranked[1][0], n_boot=n_boot),
        "method": {"test": "paired DeLong (DeLong, DeLong and Clarke-Pearson 1988), two-sided; ci95 from its "
                           "standard error", "bootstrap": f"percentile; {n_boot} paired stratified resamples, seed 0"},
    }


def _read_run(out: Path) -> tuple[dict[str, dict], dict]:
    """The scored rows of one evaluate folder (status done, a label and a probability), by name, and its
    metrics.json (empty when unreadable: it only names the model, settings and cohort)."""
    table = out / PREDICTIONS_CSV
    if not table.is_file():
        raise UsageError(f"{out}: no {PREDICTIONS_CSV}; give an output folder of `wsi-vssm evaluate`")
    rows = {r["slide"]: r for r in read_predictions_csv(table)
            if r["probability"] is not None and r["label"] is not None}
    return rows, read_metrics(out) or {}


def _ranking(rows: dict[str, dict], common: list[str]) -> tuple[np.ndarray, str]:
    """The scores to rank `common` by: the logits when every one has one (probabilities round to 1.0 above a
    logit of about 37), else the probabilities."""
    logits = [rows[s]["logit"] for s in common]
    if all(z is not None and math.isfinite(z) for z in logits):
        return np.array(logits, dtype=np.float64), "logit"
    return np.array([rows[s]["probability"] for s in common], dtype=np.float64), "probability"


def _model_of(meta: dict) -> tuple[dict, str | None]:
    """A report's `model` block and its weights hash (`hash`: the name in reports before `weights_hash`)."""
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    return model, model.get("weights_hash") or model.get("hash")


def _describe(out, meta: dict, rows: dict, common: list[str], ranked_by: str) -> dict:
    model, weights = _model_of(meta)
    return {"out": os.path.abspath(out), "metrics_read": bool(meta), "cohort": meta.get("cohort"),
            "model": model.get("name"), "weights_hash": weights, "complete": meta.get("complete"),
            "scored": len(rows), "left_out": sorted(set(rows) - set(common)), "ranked_by": ranked_by}


def _differences(meta_a: dict, meta_b: dict) -> dict[str, list]:
    """What the two runs were made with that differs: the model's weights and each parameter (A's, B's value)."""
    def settings(meta: dict) -> dict:
        model, weights = _model_of(meta)
        params = meta.get("parameters") if isinstance(meta.get("parameters"), dict) else {}
        return {"model": model.get("name"), "weights": weights and str(weights)[:12],
                **{k: v for k, v in params.items() if k not in ("params_hash", "model_hash")}}

    a, b = settings(meta_a), settings(meta_b)
    return {k: [a.get(k), b.get(k)] for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)}
