"""Figures of a ranking beyond the AUC, for metrics.json: the sensitivity at fixed specificities (as screening
papers quote it) and the average precision (the area under the precision-recall curve, which weighs the
positives' ranks, telling apart models that an imbalanced cohort's AUC does not). Each has a percentile interval
over the AUC bootstrap's own resamples (`report.stratified_resamples`: seed 0, positives and negatives drawn
separately), so the intervals of one report describe the same resampled cohorts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from wsi_vssm.outputs.report import stratified_resamples

SPECIFICITIES = (0.90, 0.95, 0.99)


def ranking_metrics(labels: Sequence[int], ranks: Sequence[float], scores: Sequence[float] | None = None,
                    n_boot: int = 2000, seed: int = 0) -> dict:
    """`sensitivity_at_specificity` ({"0.90": {sensitivity, sensitivity_ci95, threshold, rank_threshold}, ...}),
    then `average_precision`, `average_precision_ci95` and `prevalence`, over `ranks` (the logits where every item
    has one, as the AUC); the thresholds are `_thresholds`'. Every figure is None without both classes."""
    y = np.asarray(labels, dtype=np.int64)
    r = np.asarray(ranks, dtype=np.float64)
    p = r if scores is None else np.asarray(scores, dtype=np.float64)
    n1, n0 = int(y.sum()), int((y == 0).sum())
    levels = {f"{s:.2f}": s for s in SPECIFICITIES}
    if not (n1 and n0):
        return {"sensitivity_at_specificity": {key: None for key in levels}, "average_precision": None,
                "average_precision_ci95": None, "prevalence": None if y.size == 0 else n1 / y.size}
    pos, neg = np.sort(r[y == 1]), np.sort(r[y == 0])
    sens = np.empty((len(levels), n_boot))
    aps = np.empty(n_boot)
    # by counting, as report.resampled_aucs: each resample's items per distinct score, no sort per resample
    values = np.unique(np.r_[pos, neg])
    k_pos, k_neg, u = np.searchsorted(values, pos), np.searchsorted(values, neg), values.size
    for start, p_idx, n_idx in stratified_resamples(pos.size, neg.size, n_boot, seed):
        rows = p_idx.shape[0]
        offsets = (np.arange(rows) * u)[:, None]
        pc = np.bincount((k_pos[p_idx] + offsets).ravel(), minlength=rows * u).reshape(rows, u)
        nc = np.bincount((k_neg[n_idx] + offsets).ravel(), minlength=rows * u).reshape(rows, u)
        tp_down = np.cumsum(pc[:, ::-1], axis=1)  # from the highest score down: tumour items called
        called_down = np.cumsum((pc + nc)[:, ::-1], axis=1)
        aps[start : start + rows] = (pc[:, ::-1] * tp_down / np.maximum(called_down, 1)).sum(axis=1) / n1
        normal_up, tumour_up = np.cumsum(nc, axis=1), np.cumsum(pc, axis=1)
        for i, s in enumerate(levels.values()):
            kth = np.argmax(normal_up >= _rank_needed(s, n0), axis=1)  # the resample's k-th lowest normal score
            sens[i, start : start + rows] = 1.0 - tumour_up[np.arange(rows), kth] / n1
    at = {}
    for i, (key, s) in enumerate(levels.items()):
        q = neg[_rank_needed(s, n0) - 1]
        at[key] = {"sensitivity": float((pos > q).mean()), "sensitivity_ci95": _percentiles(sens[i]),
                   **_thresholds(r, p, r > q)}
    return {"sensitivity_at_specificity": at, "average_precision": average_precision(y, r),
            "average_precision_ci95": _percentiles(aps), "prevalence": n1 / y.size}


def _thresholds(r: np.ndarray, p: np.ndarray, called: np.ndarray) -> dict:
    """`rank_threshold`: the rank (logit) of the lowest-ranked item called; `threshold`: its probability, None
    where `p >= threshold` would not give this operating point (probabilities that round to 1.0 tie items the
    logits tell apart) or where nothing is called."""
    if not called.any():
        return {"threshold": None, "rank_threshold": None}
    lowest = np.argmin(np.where(called, r, np.inf))
    t = float(p[lowest])
    exact = called.all() or t > float(p[~called].max())
    return {"threshold": t if exact else None, "rank_threshold": float(r[lowest])}


def _rank_needed(specificity: float, n0: int) -> int:
    """How many normal items must score below the threshold for `specificity` (at least one)."""
    return max(1, min(n0, math.ceil(specificity * n0 - 1e-9)))


def average_precision(labels: Sequence[int], scores: Sequence[float]) -> float:
    """The average precision: the precision at each distinct score, from the highest down, weighted by the
    recall it adds (tied scores move together), as scikit-learn's `average_precision_score` defines it."""
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last_of_tie]
    precision = tps / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0, tps]) / tps[-1]
    return float((precision * recall_gain).sum())


def _percentiles(values: np.ndarray) -> list[float]:
    low, high = np.quantile(values, [0.025, 0.975])
    return [float(low), float(high)]
