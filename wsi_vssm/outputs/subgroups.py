"""Subgroup figures of a cohort (`evaluate --subgroup COLUMN`, metrics.json `subgroups`, roc_subgroups.png).

A subgroup column splits the slides by a value of the cohort table: a centre or a scanner, given for every slide,
or CAMELYON16's Macro / Micro, given for tumour slides only. Each group gets the cohort's figures (AUC with its
bootstrap interval, sensitivity and specificity at the threshold with exact intervals). Where no normal slide has
a value, every group's tumour slides are ranked against all the normal slides ("all normal slides"); otherwise a
group is the slides of its value ("within group"). A test says whether the groups' AUCs differ by more than
chance: for independent groups DeLong's chi-square (it sees only each group's AUC and its variance, so a centre
whose scores all sit higher, ranking its slides alike, does not count as a difference); for groups that share the
normal slides a permutation test of the tumour slides' groups.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from wsi_vssm.atomic import atomic_write_figure
from wsi_vssm.outputs.report import (
    bootstrap_auc_ci,
    delong_placements,
    metrics_at_threshold,
    proportion_ci,
    roc_auc,
    roc_curve,
)
from wsi_vssm.outputs.report_text import ALL_NORMAL, WITHIN_GROUP, group_auc_words

_DASHES = ("-", (0, (5, 2)), (0, (1, 1.5)), (0, (5, 2, 1, 2)))
MANY_GROUPS = 20  # more distinct values than this: more likely an identifier column than a grouping (warned)
MIN_TESTED = 2  # tumour and normal slides a group needs for DeLong's variance (with one of either it is undefined)


def subgroup_metrics(labels: Sequence[int], scores: Sequence[float], values: Sequence[str], threshold: float,
                     n_boot: int = 2000, seed: int = 0, ranks: Sequence[float] | None = None) -> dict:
    """One column's block of metrics.json `subgroups`: `negatives` (what each group's tumour slides are ranked
    against), `groups` (one per value, sorted; slides with no value form the group `null`), `heterogeneity`
    (`delong_heterogeneity` or `permutation_test`; None when fewer than two valued groups can be tested),
    `n_without_value`, and `note` (why most groups have no AUC, when they have none; else None).

    `values[i]` is item i's value ("" for none); `ranks` as in `report.cohort_metrics` (AUCs over them, the
    operating point over `scores` at `threshold`)."""
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    r = s if ranks is None else np.asarray(ranks, dtype=np.float64)
    v = np.asarray([str(x).strip() for x in values], dtype=object)
    if not (y.size == s.size == r.size == v.size):
        raise ValueError("labels, scores, ranks and values differ in length")
    shared = bool((y == 0).any()) and bool((v[y == 1] != "").any()) and not (v[y == 0] != "").any()
    names = sorted(set(v[v != ""]))
    if (v[y == 1] == "").any() if shared else (v == "").any():
        names.append("")  # the slides without a value: shown, never silently dropped
    members = {}
    for name in names:
        pos = (y == 1) & (v == name)
        members[name] = pos | (y == 0) if shared else (v == name)
    groups = [_group(name, y[m], s[m], r[m], threshold, n_boot, seed) for name, m in members.items()]
    valued = [g for g in groups if g["value"] is not None]
    if shared:
        tested = [g["value"] for g in valued if g["auc"] is not None]
        test = permutation_test(y, r, v, tested, n_perm=n_boot, seed=seed) if len(tested) >= 2 else None
    else:
        tested = [g["value"] for g in valued if min(g["n_tumour"], g["n_normal"]) >= MIN_TESTED]
        test = delong_heterogeneity(y, r, v, tested) if len(tested) >= 2 else None
    if test is not None:  # groups too small (or of one class) to weigh: named, not silently left out
        test["untested"] = [g["value"] for g in valued if g["value"] not in tested]
    one_class = [g for g in valued if g["auc"] is None]
    note = None
    if not shared and valued and len(one_class) * 2 >= len(valued):
        n_valued_normal = int(((v != "") & (y == 0)).sum())
        note = (f"{len(one_class)} of {len(valued)} groups hold one class only, so they have no AUC; "
                f"{n_valued_normal} normal slide(s) have a value in this column: if it describes tumour slides "
                "only (as Macro / Micro does), leave it empty on every normal slide, and each group is ranked "
                "against all normal slides")
    return {"negatives": ALL_NORMAL if shared else WITHIN_GROUP, "groups": groups, "heterogeneity": test,
            "n_without_value": int((v == "").sum() if not shared else (v[y == 1] == "").sum()), "note": note}


def _group(name: str, y: np.ndarray, s: np.ndarray, r: np.ndarray, threshold: float, n_boot: int,
           seed: int) -> dict:
    n1, n0 = int(y.sum()), int((y == 0).sum())
    at = metrics_at_threshold(y, s, threshold)
    g = {"value": name or None, "n_tumour": n1, "n_normal": n0, "auc": None, "auc_ci95": None,
         "sensitivity": at["sensitivity"], "sensitivity_ci95": proportion_ci(at["tp"], n1),
         "specificity": at["specificity"], "specificity_ci95": proportion_ci(at["tn"], n0)}
    if n1 and n0:
        g["auc"] = roc_auc(y, r)
        g["auc_ci95"] = list(bootstrap_auc_ci(y, r, n_boot=n_boot, seed=seed))
    else:
        g["reason"] = f"AUC needs both classes; the group has {n1} tumour and {n0} normal slides"
    return g


def delong_heterogeneity(y: np.ndarray, r: np.ndarray, v: np.ndarray, tested: list[str]) -> dict:
    """Whether independent groups' AUCs differ: the chi-square of their k - 1 differences from the last group,
    weighed by DeLong's variances (each group's own tumour and normal slides), against k - 1 degrees of freedom.
    Undefined (p None, with a `reason`) when two or more groups have no variance to weigh (AUC 0 or 1)."""
    from scipy.special import gammaincc

    aucs, variances = [], []
    for name in tested:
        m = v == name
        pos, neg = r[m & (y == 1)], r[m & (y == 0)]
        v10, v01 = delong_placements(pos, neg)
        aucs.append(float(v10.mean()))
        variances.append(float(v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size))
    k = len(tested)
    contrasts = np.hstack([np.eye(k - 1), -np.ones((k - 1, 1))])
    diff = contrasts @ np.array(aucs)
    cov = contrasts @ np.diag(variances) @ contrasts.T
    out = {"test": "DeLong chi-square", "statistic": "chi-square of the AUC differences", "value": None,
           "df": k - 1, "p": None, "groups": list(tested)}
    if np.linalg.matrix_rank(cov) < k - 1:
        return {**out, "reason": "two or more groups have AUC 0 or 1: no variance to weigh their differences"}
    chi2 = float(diff @ np.linalg.solve(cov, diff))
    return {**out, "value": chi2, "p": float(gammaincc((k - 1) / 2, chi2 / 2))}


def permutation_test(y: np.ndarray, r: np.ndarray, v: np.ndarray, tested: list[str], n_perm: int = 2000,
                     seed: int = 0) -> dict:
    """Whether groups of tumour slides ranked against the same normal slides differ: the statistic is the
    variance of the group AUCs weighed by their tumour slides, its null distribution that of `n_perm` regroupings
    of the tumour slides (each group keeps its size). p = (1 + regroupings at least as large) / (1 + n_perm), never
    0. A group's AUC is the mean of its tumour slides' placements among the normal slides, so a regrouping costs
    no ranking."""
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(np.isin(v, tested) & (y == 1))
    place, _ = delong_placements(r[pos], r[y == 0])
    code = np.searchsorted(tested, v[pos].astype(str))
    counts = np.bincount(code)
    mean = place.mean()  # the same for every regrouping

    def statistic(groups: np.ndarray) -> float:
        aucs = np.bincount(groups, place) / counts
        return float((counts * (aucs - mean) ** 2).sum() / counts.sum())

    observed = statistic(code)
    spreads = np.array([statistic(rng.permutation(code)) for _ in range(n_perm)])
    extreme = int((spreads >= observed - 1e-12).sum())  # ties count as at least as large
    return {"test": "permutation", "statistic": "tumour-weighted variance of the group AUCs", "value": observed,
            "p": (1 + extreme) / (1 + n_perm), "permutations": int(n_perm), "seed": int(seed),
            "groups": list(tested)}


def subgroups_png(path: str | os.PathLike, labels: Sequence[int], ranks: Sequence[float],
                  columns: dict[str, Sequence[str]], blocks: dict) -> None:
    """roc_subgroups.png: one panel per subgroup column, each group with an AUC drawn as its ROC curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y, r = np.asarray(labels, dtype=np.int64), np.asarray(ranks, dtype=np.float64)
    fig = Figure(figsize=(4.5 * len(blocks), 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(blocks), squeeze=False)[0]
    for ax, (column, block) in zip(axes, blocks.items(), strict=True):
        v = np.asarray([str(x).strip() for x in columns[column]], dtype=object)
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6", label="chance")
        for i, g in enumerate(block["groups"]):
            if g["auc"] is None:
                continue
            value = g["value"] or ""
            m = (v == value) & (y == 1) | ((y == 0) if block["negatives"] == ALL_NORMAL else (v == value) & (y == 0))
            fpr, tpr, _ = roc_curve(y[m], r[m])
            # dashes differ too: curves that coincide (two groups at AUC 1) stay told apart
            ax.plot(fpr, tpr, lw=1.4, color=f"C{i % 10}", ls=_DASHES[i % len(_DASHES)], clip_on=False,
                    label=f"{g['value'] or '(no value)'}: AUC {group_auc_words(g)}; {g['n_tumour']} tumour, "
                          f"{g['n_normal']} normal")
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity (false-positive rate)",
               ylabel="sensitivity (true-positive rate)", aspect="equal")
        against = ", against all normal slides" if block["negatives"] == ALL_NORMAL else ""
        test = block["heterogeneity"]
        p = "" if test is None or test["p"] is None else f"; {test['test']} p = {test['p']:.3g}"
        ax.set_title(f"ROC by {column}{against}{p}", fontsize=9)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    atomic_write_figure(path, fig)
