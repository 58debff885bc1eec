"""Calibration of probabilities against 0/1 labels: ECE, its bootstrap interval, the ECE a perfectly calibrated
model would still show on the same cohort, and the reliability diagram (`calibration.png`).

ECE over a few dozen slides is mostly sampling noise when the probabilities sit mid-range: a model whose
probabilities are exactly right still scores well above 0 on 80 slides. `ece_if_calibrated` measures that floor
by drawing each slide's label from its own probability, so a report can tell miscalibration from small-cohort
noise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from wsi_vssm.atomic import atomic_write_figure

ECE_BINS = 10  # equal-width probability bins, as the detector issue states ECE


def logistic(z):
    """1 / (1 + exp(-z)) in float64 (a float for a float), without overflow. float32's sigmoid is exactly 1.0 for
    every logit above 16.6, so slides or patches the model scores at 17 and at 50 tied in every AUC; float64
    keeps them apart up to about 36.7 (beyond, rank by the logit itself: `slide_logit`, predictions.csv's
    `logit`)."""
    p = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))
    return float(p) if np.ndim(p) == 0 else p


def logit(p):
    """log(p / (1 - p)) in float64, p clipped into the open interval float64 can hold (|logit| <= 36.7 or so)."""
    q = np.clip(np.asarray(p, np.float64), np.finfo(np.float64).tiny, np.nextafter(1.0, 0.0))
    z = np.log(q) - np.log1p(-q)
    return float(z) if np.ndim(z) == 0 else z


def patch_probabilities(probs, metadata: dict | None):
    """Isolated-patch probabilities (`evaluate PATCHES`: each patch scored alone, by its centre token) put on the
    calibrated scale with the model file's `patch_calibration` (Platt a, b fitted on selection patches scored
    alone); unchanged for files without one. Heatmap cells, scored in context, are calibrated in the cell head."""
    p = np.asarray(probs, np.float64)
    return logistic(patch_logits(logit(p), metadata)) if (metadata or {}).get("patch_calibration") else p


def patch_logits(logits, metadata: dict | None) -> np.ndarray:
    """Isolated-patch logits on the calibrated scale (`patch_probabilities` is their logistic): a z + b with the
    model file's `patch_calibration`, unchanged without one. Ranks patches where probabilities tie at 1.0."""
    cal = (metadata or {}).get("patch_calibration")
    z = np.asarray(logits, np.float64)
    return float(cal["a"]) * z + float(cal["b"]) if cal else z


def _finite(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(labels, np.float64).reshape(-1), np.asarray(probs, np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in length: {y.size} against {p.size}")
    ok = np.isfinite(p)
    y, p = y[ok], p[ok]
    if ((p < 0) | (p > 1)).any():  # a logit or a percentage passed for a probability: its ECE would mean nothing
        raise ValueError(f"probabilities must lie in [0, 1]; got {p[(p < 0) | (p > 1)][0]:g}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1; got {y[~np.isin(y, (0, 1))][0]:g}")
    return y, p


def _bin_of(p: np.ndarray, bins: int) -> np.ndarray:
    """Bin k holds floor(p * bins) == k, so [k/bins, (k+1)/bins) as p * bins rounds (0.3 and 0.7 fall in the bin
    above them), and 1.0 the last."""
    return np.clip((p * bins).astype(np.int64), 0, bins - 1)


def expected_calibration_error(labels, probs, bins: int = ECE_BINS) -> float:
    """Sum over `bins` equal-width bins of (share of items) x |share of positives - mean probability|; items with
    a non-finite probability are left out; NaN when none is left."""
    y, p = _finite(labels, probs)
    if not len(p):
        return math.nan
    return float(_ece_rows(y[None], p, bins)[0])


def _ece_rows(y: np.ndarray, p: np.ndarray, bins: int) -> np.ndarray:
    """ECE of each row of labels `y` (R, n) against the one probability vector `p` (n,)."""
    which = _bin_of(p, bins)
    onehot = np.zeros((bins, len(p)))
    onehot[which, np.arange(len(p))] = 1.0
    conf = onehot @ p  # summed probability per bin
    pos = y @ onehot.T  # (R, bins) positives per bin
    return np.abs(pos - conf).sum(1) / len(p)


def reliability_bins(labels, probs, bins: int = ECE_BINS) -> list[dict]:
    """One row per non-empty bin: its range, item count, mean probability and share of positives."""
    y, p = _finite(labels, probs)
    which = _bin_of(p, bins)
    rows = []
    for k in range(bins):
        sel = which == k
        if sel.any():
            rows.append({"low": k / bins, "high": (k + 1) / bins, "n": int(sel.sum()),
                         "mean_probability": float(p[sel].mean()), "positive_share": float(y[sel].mean())})
    return rows


def bootstrap_ece_ci(labels, probs, n_boot: int = 2000, seed: int = 0, bins: int = ECE_BINS,
                     alpha: float = 0.05) -> tuple[float, float] | None:
    """Bias-corrected percentile interval of the ECE over `n_boot` resamples of the items (with replacement),
    clipped to [0, 1]; None without items. The ECE of a resample is biased upward (its bins hold repeated items and
    fewer distinct ones), so the plain percentile interval can lie wholly above the estimate itself (0.044 with
    "95% CI 0.047-0.104" on 200 PCam patches); the interval is shifted down by that bootstrap bias (the mean
    resample ECE minus the estimate)."""
    y, p = _finite(labels, probs)
    if not len(p):
        return None
    order = np.lexsort((p, y))  # the interval depends on the items, not on the order of the rows
    y, p = y[order], p[order]
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, len(p), len(p))
        vals[i] = _ece_rows(y[idx][None], p[idx], bins)[0]
    bias = float(vals.mean()) - float(_ece_rows(y[None], p, bins)[0])
    low, high = np.quantile(vals, [alpha / 2, 1 - alpha / 2]) - bias
    # a negative bias (a few items) shifts it up: the ECE lies in [0, 1] ("95% CI 0.057-1.045" on 4 slides)
    return min(1.0, max(0.0, float(low))), min(1.0, max(0.0, float(high)))


def ece_if_calibrated(probs, n_sim: int = 2000, seed: int = 0, bins: int = ECE_BINS) -> dict | None:
    """The ECE a perfectly calibrated model would show with these probabilities on a cohort of this size: each
    item's label drawn as Bernoulli(its probability), `n_sim` times. Median and 90% range; None without items."""
    _, p = _finite(np.zeros(np.size(probs)), probs)  # the same checks as the others
    p = np.sort(p)  # order-free, as the interval
    if not len(p):
        return None
    rng = np.random.default_rng(seed)
    sims = np.concatenate([_ece_rows((rng.random((b, len(p))) < p).astype(np.float64), p, bins)
                           for b in _batches(n_sim, len(p))])
    low, mid, high = np.quantile(sims, [0.05, 0.5, 0.95])
    return {"median": float(mid), "range90": [float(low), float(high)]}


def _batches(n: int, width: int) -> list[int]:
    per = max(1, 4_000_000 // max(1, width))  # bound the (batch, n) label matrix
    return [min(per, n - s) for s in range(0, n, per)]


def calibration_summary(labels, probs, n_boot: int = 2000, seed: int = 0, bins: int = ECE_BINS) -> dict:
    """metrics.json's `calibration` block (docs/outputs.md)."""
    y, p = _finite(labels, probs)
    ci = bootstrap_ece_ci(y, p, n_boot, seed, bins)
    return {"bins": bins, "ece": expected_calibration_error(y, p, bins) if len(p) else None,
            "ece_ci95": None if ci is None else list(ci), "ece_if_calibrated": ece_if_calibrated(p, n_boot, seed, bins),
            "reliability": reliability_bins(y, p, bins),
            "brier": float(np.mean((p - y) ** 2)) if len(p) else None,
            "brier_ci95": bootstrap_brier_ci(y, p, n_boot, seed),
            **logistic_recalibration(y, p)}


def bootstrap_brier_ci(labels, probs, n_boot: int = 2000, seed: int = 0) -> list[float] | None:
    """Percentile 95% interval of the Brier score (mean squared difference of probability and label) over
    `n_boot` resamples of the items, seed `seed`, independent of the rows' order; None without items."""
    y, p = _finite(labels, probs)
    if not len(p):
        return None
    order = np.lexsort((p, y))
    sq = ((p - y) ** 2)[order]
    rng = np.random.default_rng(seed)
    vals = np.concatenate([sq[rng.integers(0, len(sq), (b, len(sq)))].mean(axis=1) for b in _batches(n_boot, len(sq))])
    low, high = np.quantile(vals, [0.025, 0.975])
    return [float(low), float(high)]


def logistic_recalibration(labels, probs) -> dict:
    """The calibration intercept and slope, as prediction-model reports (TRIPOD) give them: the `slope` b of the
    logistic regression of the labels on the probabilities' logits (a + b logit p; 1 when the probabilities are
    neither too extreme (b < 1) nor too modest (b > 1)), and the `intercept` a with the slope held at 1
    (calibration-in-the-large: 0 when the mean probability matches the share of tumour; below 0, too high), each
    with a Wald 95% interval. Both None without both classes, and the slope None where its fit has no finite
    answer (every probability the same, or classes the probabilities separate completely);
    `recalibration_reason` says why (None when both are given)."""
    y, p = _finite(labels, probs)
    none = {"intercept": None, "intercept_ci95": None, "slope": None, "slope_ci95": None}
    if not (y.any() and (y == 0).any()):
        return {**none, "recalibration_reason": "needs both classes"}
    z = logit(p)
    half = NormalDist().inv_cdf(0.975)
    # with the slope held at 1 the likelihood has a finite maximum whenever both classes are present
    large = _newton_logistic(np.ones((len(z), 1)), y, z, np.array([0.0]))
    if large is None:  # not seen: a guard for numbers no cohort has
        return {**none, "recalibration_reason": "the intercept's fit did not converge"}
    (a,), cov_a = large
    out = {"intercept": float(a), "intercept_ci95": _wald(a, cov_a[0, 0], half), "slope": None, "slope_ci95": None,
           "recalibration_reason": None}
    fit = _newton_logistic(np.stack([np.ones_like(z), z], axis=1), y, np.zeros_like(z), np.array([0.0, 1.0]))
    if fit is None:
        return {**out, "recalibration_reason": "no finite slope: the probabilities separate the classes completely, "
                                               "or are all the same"}
    (_, b), cov = fit
    return {**out, "slope": float(b), "slope_ci95": _wald(b, cov[1, 1], half)}


def _wald(value: float, variance: float, half: float) -> list[float]:
    se = math.sqrt(max(variance, 0.0))
    return [float(value - half * se), float(value + half * se)]


def _newton_logistic(x: np.ndarray, y: np.ndarray, offset: np.ndarray, beta: np.ndarray):
    """Maximum-likelihood logistic coefficients of y on x (plus a fixed `offset`) by Newton's method with step
    halving, and their covariance (the inverse information); None when it does not converge to a finite fit."""
    def loglik(b):
        eta = offset + x @ b
        return float(np.sum(y * eta - np.logaddexp(0.0, eta)))

    current = loglik(beta)
    for _ in range(100):
        mu = logistic(offset + x @ beta)
        info = x.T @ (x * (mu * (1 - mu))[:, None])
        try:
            step = np.linalg.solve(info, x.T @ (y - mu))
        except np.linalg.LinAlgError:
            return None
        for _ in range(30):  # halve the step until the likelihood does not fall
            trial = loglik(beta + step)
            if trial >= current - 1e-12:
                break
            step = step / 2
        beta, current = beta + step, trial
        if np.max(np.abs(step)) < 1e-9:
            if np.max(np.abs(beta)) > 1e3 or np.linalg.cond(info) > 1e12:
                return None
            return beta, np.linalg.inv(info)
    return None  # still moving after 100 steps: the likelihood has no maximum (separated classes)


def calibration_png(path: str | os.PathLike, labels: Sequence[int], probs: Sequence[float],
                    summary: dict | None = None) -> None:
    """The reliability diagram (`calibration_figure`) as a PNG, atomically."""
    fig = calibration_figure(labels, probs, summary)
    atomic_write_figure(path, fig)


def calibration_figure(labels: Sequence[int], probs: Sequence[float], summary: dict | None = None):
    """The reliability diagram as a matplotlib Figure: each bin's share of positives against its mean probability
    (marker area by count), the diagonal, and the ECE with its interval and floor in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = summary or calibration_summary(labels, probs)
    fig = Figure(figsize=(4.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6", label="perfectly calibrated")
    rows = summary["reliability"]
    if rows:
        n = max(r["n"] for r in rows)
        ax.plot([r["mean_probability"] for r in rows], [r["positive_share"] for r in rows], "-", color="C0", lw=1)
        ax.scatter([r["mean_probability"] for r in rows], [r["positive_share"] for r in rows],
                   s=[12 + 80 * r["n"] / n for r in rows], color="C0", zorder=3, label="bins (area: count)",
                   clip_on=False)  # bins at 0 or 1 drawn whole
        title = f"ECE {summary['ece']:.3f}"
        if summary["ece_ci95"]:
            title += f" (95% CI {summary['ece_ci95'][0]:.3f}-{summary['ece_ci95'][1]:.3f})"
        floor = summary["ece_if_calibrated"]
        title += (f"\nexact probabilities would give {floor['median']:.3f} (90%: {floor['range90'][0]:.3f}-"
                  f"{floor['range90'][1]:.3f}) on n={sum(r['n'] for r in rows)}")
    else:
        title = "no probabilities to calibrate"
    # a margin, so that bins at 0 or 1 do not sit on the frame; the legend under the axes, where it covers no bin
    ax.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), ylabel="share of tumour", aspect="equal",
           xlabel=f"mean predicted probability ({summary.get('bins', 10)} equal-width bins)")
    ax.set_title(title, fontsize=8)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
