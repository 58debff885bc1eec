"""Cohort report: ROC AUC with a bootstrap confidence interval, metrics at a threshold, the ROC plot and the
predictions table. Labels are 0 (normal) / 1 (tumour); a slide is called positive when its score >= threshold.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from statistics import NormalDist

import numpy as np

from wsi_vssm.atomic import atomic_write_figure, atomic_write_json, atomic_write_text
from wsi_vssm.errors import UsageError, is_real_number
from wsi_vssm.outputs.files import from_spreadsheet_safe, spreadsheet_safe
from wsi_vssm.outputs.report_text import interval_text, interval_words  # noqa: F401  (here before 2026-12-08)

METRIC_KEYS = (
    "auc", "auc_ci95", "auc_ci95_delong", "accuracy", "sensitivity", "specificity", "threshold", "n", "n_failed",
)  # fmt: skip
# in_domain and logit last: added later, so readers by position keep working
CSV_COLUMNS = ("slide", "label", "probability", "status", "error", "in_domain", "logit")
PREDICTION_KEYS = (
    "slide", "probability", "label", "threshold", "reason", "model", "mpp", "parameters", "timings", "version",
)  # fmt: skip


def rankdata(x, axis: int = -1) -> np.ndarray:
    """Ranks from 1 along `axis`, tied values sharing their mean rank (scipy.stats.rankdata's 'average'; that
    import alone took about a second of every `evaluate`)."""
    a = np.moveaxis(np.asarray(x, dtype=float), axis, -1)
    n = a.shape[-1]
    order = np.argsort(a, axis=-1, kind="stable")
    v = np.take_along_axis(a, order, axis=-1)
    starts = np.ones(a.shape, dtype=bool)  # where a run of tied values begins, and ends, in sorted order
    starts[..., 1:] = v[..., 1:] != v[..., :-1]
    ends = np.ones(a.shape, dtype=bool)
    ends[..., :-1] = starts[..., 1:]
    i = np.arange(n)
    first = np.maximum.accumulate(np.where(starts, i, 0), axis=-1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, i, n), axis=-1), axis=-1), axis=-1)
    ranks = np.empty(a.shape)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=-1)
    return np.moveaxis(ranks, -1, axis)


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties counting one half.

    Computed from average ranks (the Mann-Whitney U statistic), so tied scores are handled exactly.
    Raises `UsageError` when either class is missing.
    """
    y, s = _check(labels, scores)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        raise UsageError(f"AUC needs both classes; got {n1} positive and {n0} negative slides")
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def roc_auc_or_nan(labels: Sequence[int], scores: Sequence[float]) -> float:
    """`roc_auc`, or NaN when the labels hold one class only (training logs, where that is no error)."""
    y = np.asarray(labels)
    if y.size == 0 or np.all(y == y.flat[0]):
        return math.nan
    return roc_auc(labels, scores)


def bootstrap_auc_ci(
    labels: Sequence[int], scores: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile (1 - alpha) interval of the AUC over `n_boot` stratified bootstrap resamples.

    Positives and negatives are resampled separately, each to its own count, so every resample has both
    classes and the class balance of the cohort. Deterministic for a given `seed`, whatever the order of the
    slides.
    """
    y, s = _check(labels, scores)
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise UsageError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < alpha < 1:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}")
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])  # sorted: the interval cannot depend on the rows' order
    if pos.size == 0 or neg.size == 0:
        raise UsageError(f"AUC needs both classes; got {pos.size} positive and {neg.size} negative slides")
    aucs = np.empty(n_boot)
    for start, p_idx, n_idx in stratified_resamples(pos.size, neg.size, n_boot, seed):
        aucs[start : start + p_idx.shape[0]] = resampled_aucs(pos, neg, p_idx, n_idx)
    low, high = np.quantile(aucs, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def stratified_resamples(n_pos: int, n_neg: int, n_boot: int, seed: int = 0):
    """The AUC bootstrap's resamples, in batches: (first resample's number, positive indices (b, n_pos), negative
    indices (b, n_neg)). Every interval drawn from them (`outputs.ranking`'s too) resamples the same cohorts."""
    rng = np.random.default_rng(seed)
    batch = max(1, 2_000_000 // (n_pos + n_neg))  # bound memory on large cohorts
    for start in range(0, n_boot, batch):
        b = min(batch, n_boot - start)
        p_idx = rng.integers(0, n_pos, size=(b, n_pos))
        yield start, p_idx, rng.integers(0, n_neg, size=(b, n_neg))


def delong_placements(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's placement values: each positive's share of negatives below it, each negative's share of positives
    above it, ties counting one half (from midranks, so O(n log n)). Their means are the AUC."""
    m, n = pos.size, neg.size
    overall = rankdata(np.concatenate([pos, neg]))
    return (overall[:m] - rankdata(pos)) / n, 1.0 - (overall[m:] - rankdata(neg)) / m


def resampled_aucs(pos: np.ndarray, neg: np.ndarray, p_idx: np.ndarray, n_idx: np.ndarray) -> np.ndarray:
    """The AUC of each resample (row) that takes the positives `pos[p_idx[b]]` and the negatives `neg[n_idx[b]]`,
    ties counting one half, by counting: each resample's negatives per distinct score, their running sum, and for
    each drawn positive the negatives below it plus half those tied. The numerator is a sum of halves, exact in
    float64, so the values equal the Mann-Whitney rank sums' to the last bit, without sorting each resample
    (9x faster at 100,000 items, 2026-12-07)."""
    values = np.unique(np.concatenate([pos, neg]))
    k_pos, k_neg = np.searchsorted(values, pos), np.searchsorted(values, neg)
    rows, u = p_idx.shape[0], values.size
    offsets = (np.arange(rows) * u)[:, None]
    counts = np.bincount((k_neg[n_idx] + offsets).ravel(), minlength=rows * u).reshape(rows, u)
    below = np.cumsum(counts, axis=1) - counts  # negatives strictly below each distinct score
    wins = np.take_along_axis(below + 0.5 * counts, k_pos[p_idx], axis=1).sum(axis=1)
    return wins / (pos.size * neg.size)


def delong_auc_ci(labels: Sequence[int], scores: Sequence[float], alpha: float = 0.05) -> tuple[float, float] | None:
    """(1 - alpha) interval of the AUC from DeLong's variance, formed on the logit scale and mapped back, so it
    stays inside (0, 1). None where it is undefined: an AUC of 0 or 1, scores all tied (no variance to measure)
    or a class of fewer than 2 slides. In simulated binormal cohorts of 10 to 40 slides a class it covered the
    true AUC 93-97% of the time, the percentile bootstrap 85-93% (`bench/auc_interval.py`; at 5 a class
    neither holds)."""
    y, s = _check(labels, scores)
    if not 0 < alpha < 1:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}")
    pos, neg = s[y == 1], s[y == 0]
    m, n = pos.size, neg.size
    if m < 2 or n < 2:
        return None
    v10, v01 = delong_placements(pos, neg)
    auc = float(v10.mean())
    variance = v10.var(ddof=1) / m + v01.var(ddof=1) / n
    if auc <= 0.0 or auc >= 1.0 or variance <= 0.0:  # every score tied: no spread to measure, not certainty
        return None
    se = math.sqrt(variance) / (auc * (1.0 - auc))  # the delta method on the logit
    centre, half = math.log(auc / (1.0 - auc)), NormalDist().inv_cdf(1.0 - alpha / 2) * se
    return 1.0 / (1.0 + math.exp(-(centre - half))), 1.0 / (1.0 + math.exp(-(centre + half)))


def metrics_at_threshold(labels: Sequence[int], scores: Sequence[float], threshold: float) -> dict:
    """accuracy, sensitivity, specificity (None when their denominator is 0) and tp, fp, tn, fn counts."""
    y, s = _check(labels, scores)
    threshold = _threshold(threshold)
    called = s >= threshold
    tp = int((called & (y == 1)).sum())
    fp = int((called & (y == 0)).sum())
    tn = int((~called & (y == 0)).sum())
    fn = int((~called & (y == 1)).sum())
    return {
        "accuracy": _ratio(tp + tn, y.size),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def proportion_ci(k: int, n: int, alpha: float = 0.05) -> list[float] | None:
    """Clopper-Pearson (exact binomial) (1 - alpha) interval of the proportion k / n, as diagnostic-accuracy
    papers quote sensitivity and specificity; None when n is 0. It holds its level at any n, so it is
    conservative (wider than Wilson's) on small counts."""
    if not (isinstance(k, (int, np.integer)) and isinstance(n, (int, np.integer)) and 0 <= k <= n):
        raise UsageError(f"a proportion needs counts 0 <= k <= n, got {k!r} of {n!r}")
    if not 0 < alpha < 1:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}")
    if n == 0:
        return None
    from scipy.special import betaincinv  # 0.3 s to import: only when a report is written

    low = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, alpha / 2))
    high = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - alpha / 2))
    return [low, high]


def operating_point(labels: Sequence[int], scores: Sequence[float], threshold: float) -> dict:
    """metrics.json's counts at `threshold` (a score >= it is called tumour): the items of each class, the
    confusion counts, exact 95% intervals (`proportion_ci`) of sensitivity, specificity and accuracy, the
    positive and negative predictive values with theirs, and F1 (None where a denominator is 0)."""
    m = metrics_at_threshold(labels, scores, threshold)
    tp, fp, tn, fn = m["tp"], m["fp"], m["tn"], m["fn"]
    return {"n_tumour": tp + fn, "n_normal": tn + fp, "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
            "sensitivity_ci95": proportion_ci(tp, tp + fn), "specificity_ci95": proportion_ci(tn, tn + fp),
            "accuracy_ci95": proportion_ci(tp + tn, tp + fp + tn + fn),
            # predictive values hold at this cohort's prevalence only (docs/outputs.md)
            "ppv": _ratio(tp, tp + fp), "ppv_ci95": proportion_ci(tp, tp + fp),
            "npv": _ratio(tn, tn + fn), "npv_ci95": proportion_ci(tn, tn + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn)}


def cohort_metrics(
    labels: Sequence[int],
    scores: Sequence[float],
    threshold: float,
    n_failed: int = 0,
    n_boot: int = 2000,
    seed: int = 0,
    ranks: Sequence[float] | None = None,
    items: str = "slides",
) -> dict:
    """The content of `metrics.json`: exactly `METRIC_KEYS`, in that order, over the slides that succeeded
    (`items`: what is counted, "slides" or "patches", as the reason names them).

    `ranks`: a score in the same order as `scores` that does not round (the logits they are the logistic of),
    for the AUC and its intervals; sensitivity and the rest are taken on `scores` at `threshold`.

    `auc` and its intervals are None when a class is missing; then (only then) a `reason` key says why
    (`auc_ci95_delong` is also None where `delong_auc_ci` says it is undefined). The other
    metrics are None when undefined (e.g. sensitivity without positive slides; everything when n == 0).
    """
    y, s = _check(labels, scores)
    r = s if ranks is None else _check(labels, ranks)[1]
    if not (isinstance(n_failed, (int, np.integer)) and n_failed >= 0):
        raise UsageError(f"n_failed must be a non-negative integer, got {n_failed!r}")
    threshold = _threshold(threshold)
    at = metrics_at_threshold(y, s, threshold)
    n1 = int(y.sum())
    n0 = y.size - n1
    out: dict = {"auc": None, "auc_ci95": None, "auc_ci95_delong": None}
    reason = None
    if n1 and n0:
        out["auc"] = roc_auc(y, r)
        out["auc_ci95"] = list(bootstrap_auc_ci(y, r, n_boot=n_boot, seed=seed))
        delong = delong_auc_ci(y, r)
        out["auc_ci95_delong"] = None if delong is None else list(delong)
    else:
        reason = f"AUC needs both classes; the cohort has {n1} tumour and {n0} normal {items} with a prediction"
    out.update(
        accuracy=at["accuracy"],
        sensitivity=at["sensitivity"],
        specificity=at["specificity"],
        threshold=threshold,
        n=int(y.size),
        n_failed=int(n_failed),
    )
    if reason:
        out["reason"] = reason
    return out


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score, from (0, 0) at +inf down to (1, 1)."""
    y, s = _check(labels, scores)
    n1, n0 = int(y.sum()), int((y == 0).sum())
    if n1 == 0 or n0 == 0:
        raise UsageError(f"a ROC curve needs both classes; got {n1} positive and {n0} negative slides")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]  # tied scores move together
    tps = np.cumsum(y_sorted)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return np.r_[0.0, fps / n0], np.r_[0.0, tps / n1], np.r_[np.inf, s_sorted[last_of_tie]]


def roc_png(
    path: str | os.PathLike,
    labels: Sequence[int],
    scores: Sequence[float],
    auc: float | None = None,
    ci: Sequence[float] | None = None,
    threshold: float | None = None,
    items: str = "slides",
    ranks: Sequence[float] | None = None,
) -> None:
    """Write the ROC curve to `path` as PNG, atomically: the chance diagonal, the AUC and its CI in the legend,
    and the operating point at `threshold` when given. Without both classes the plot says so instead. `items`
    names what was scored ("slides", "patches") in the title. `ranks`: as in `cohort_metrics` (the curve is
    drawn over them; the operating point is `scores` at `threshold`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y, s = _check(labels, scores)
    fig = Figure(figsize=(4.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)  # the Agg canvas directly: no pyplot global state
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6", label="chance")
    n1, n0 = int(y.sum()), int((y == 0).sum())
    if n1 and n0:
        r = s if ranks is None else _check(y, ranks)[1]
        fpr, tpr, _ = roc_curve(y, r)
        auc = roc_auc(y, r) if auc is None else auc
        ax.plot(fpr, tpr, lw=1.6, color="C3", label=f"AUC {auc:.3f}{interval_text(ci)}", clip_on=False)
        if threshold is not None:
            m = metrics_at_threshold(y, s, threshold)
            ax.plot(1 - m["specificity"], m["sensitivity"], "o", color="k", ms=5, clip_on=False,
                    label=f"threshold {threshold:.3g}: sensitivity {m['sensitivity']:.2f}, "
                          f"specificity {m['specificity']:.2f}")  # clip_on: a point at (1, 1) drawn whole
    else:
        ax.text(0.5, 0.6, f"ROC undefined:\n{n1} tumour, {n0} normal {items}", ha="center", fontsize=9)
    # a little room past 0 and 1: a curve along the frame (AUC 1) stays visible
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity (false-positive rate)",
           ylabel="sensitivity (true-positive rate)", aspect="equal")
    ax.set_title(f"ROC over {_count(y.size, items)} ({n1} tumour, {n0} normal)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write_figure(path, fig)


def write_prediction_json(path: str | os.PathLike, record: Mapping) -> None:
    """Write one slide's `prediction.json` atomically, keys in `PREDICTION_KEYS` order.

    Every key must be present (None where unknown) and no other. `reason` must say why when `probability` is
    None, and be None otherwise.
    """
    missing = [k for k in PREDICTION_KEYS if k not in record]
    extra = sorted(set(record) - set(PREDICTION_KEYS))
    if missing or extra:
        raise UsageError(f"prediction record: missing keys {missing}, unknown keys {extra}")
    if (record["probability"] is None) != (record["reason"] is not None):
        raise UsageError("prediction record: `reason` is required exactly when `probability` is null")
    atomic_write_json(path, {k: record[k] for k in PREDICTION_KEYS})


def write_predictions_csv(path: str | os.PathLike, rows: Iterable[Mapping]) -> None:
    """Write `predictions.csv` atomically: columns slide, label, probability, status, error, in_domain, logit.

    Each row is a mapping with `slide` and `status` (`done`, `no_tissue`, `failed`; in a report that is not
    complete `pending` or `in_progress`, with no probability) and optionally `label` (0/1), `probability` and
    `error` (the error, or why a slide is not finished) and `in_domain` (the slide's prediction.json
    verdict: true / false; empty for patches and slides without a prediction) and `logit` (the score the
    probability is the logistic of: prediction.json's `slide_logit`, a patch's calibrated logit; it orders the
    items whose probabilities round to the same value, 1.0 above a logit of about 37). Missing or None values are
    written as empty cells; probabilities in full precision (repr), so a resumed run reads back exactly what
    was written.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or not row.get("slide") or not row.get("status"):
            raise UsageError(f"predictions row {i} needs a slide name and a status, got {row!r}")
        unknown = set(row) - set(CSV_COLUMNS)
        if unknown:
            raise UsageError(f"predictions row {i} has unknown column(s) {sorted(unknown)}; valid: {CSV_COLUMNS}")
        p = row.get("probability")
        prob = "" if p is None or (isinstance(p, float) and math.isnan(p)) else repr(float(p))
        label = "" if row.get("label") is None else str(int(row["label"]))
        error = " ".join(str(row.get("error") or "").split())  # one line per slide
        domain = "" if row.get("in_domain") is None else str(bool(row["in_domain"])).lower()
        z = row.get("logit")
        logit = "" if z is None or (isinstance(z, float) and math.isnan(z)) else repr(float(z))
        writer.writerow([spreadsheet_safe(row["slide"]), label, prob, row["status"], spreadsheet_safe(error), domain,
                         logit])
    atomic_write_text(path, buf.getvalue())


def read_predictions_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a `predictions.csv` as dicts: label int or None, probability and logit float or None, error str or
    None (tables written before the `logit` column read it as None)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = set(CSV_COLUMNS[:4]) - set(reader.fieldnames or ())
            if missing:
                raise UsageError(f"{os.fspath(path)}: predictions table lacks column(s) {sorted(missing)}")
            return [
                {
                    "slide": from_spreadsheet_safe(r["slide"]),
                    "label": int(r["label"]) if r["label"] else None,
                    "probability": float(r["probability"]) if r["probability"] else None,
                    "status": r["status"],
                    "error": from_spreadsheet_safe(r.get("error") or "") or None,
                    "in_domain": {"true": True, "false": False}.get(r.get("in_domain") or ""),
                    "logit": float(r["logit"]) if r.get("logit") else None,
                }
                for r in reader
            ]
    except OSError as err:
        raise UsageError(f"{os.fspath(path)}: cannot read predictions table: {err.strerror or err}") from err
    except ValueError as err:
        raise UsageError(f"{os.fspath(path)}: malformed predictions table: {err}") from err


# ---- input checks --------------------------------------------------------------------------------------------
def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    try:
        y = np.asarray(labels, dtype=np.float64).ravel()
        s = np.asarray(scores, dtype=np.float64).ravel()
    except (TypeError, ValueError) as err:
        raise UsageError(f"labels and scores must be numbers: {err}") from err
    if y.size != s.size:
        raise UsageError(f"{y.size} labels but {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise UsageError(f"labels must be 0 or 1, got {sorted(set(y[~np.isin(y, (0, 1))].tolist()))[:5]}")
    if not np.isfinite(s).all():
        raise UsageError(f"scores must be finite; {int((~np.isfinite(s)).sum())} are not")
    return y.astype(np.int64), s


def _threshold(t) -> float:
    if not is_real_number(t) or not math.isfinite(t):
        raise UsageError(f"threshold must be a finite number, got {t!r}")
    return float(t)


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _count(n: int, items: str) -> str:
    """`3 slides`, `1 slide`, `1 patch`: `items` is a plural noun."""
    if n != 1:
        return f"{n} {items}"
    return f"1 {items[:-2] if items.endswith(('ches', 'shes', 'xes')) else items[:-1]}"
