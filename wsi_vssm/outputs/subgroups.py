"""Subgroup figures of a cohort (`evaluate --subgroup COLUMN`, metrics.json `subgroups`, roc_subgroups.png).

A subgroup column splits the slides by a value of the cohort table: a centre or a scanner, given for every slide,
or CAMELYON16's Macro / Micro, given for tumour slides only. Each group gets the cohort's figures (AUC with its
bootstrap interval, sensitivity and specificity at the threshold with exact intervals). Where no normal slide has
a value, every group's tumour slides are ranked against all the normal slides ("all normal slides"); otherwise a
group is the slides of its value ("within group"). A permutation test says whether the groups' AUCs differ more
than a random regrouping of the same slides would make them.
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
from wsi_vssm.outputs.report_text import group_auc_words

WITHIN_GROUP = "within group"
ALL_NORMAL = "all normal slides"  # spelt out in outputs.report_text too (no numpy there)
_DASHES = ("-", (0, (5, 2)), (0, (1, 1.5)), (0, (5, 2, 1, 2)))
MANY_GROUPS = 20  # more distinct values than this: more likely an identifier column than a grouping (warned)


def subgroup_metrics(labels: Sequence[int], scores: Sequence[float], values: Sequence[str], threshold: float,
                     n_boot: int = 2000, seed: int = 0, ranks: Sequence[float] | None = None) -> dict:
    """One column's block of metrics.json `subgroups`: `negatives` (what each group's tumour slides are ranked
    against), `groups` (one per value, sorted; slides with no value form the group `null`), `heterogeneity`
    (`permutation_test`, None when fewer than two valued groups have an AUC) and `n_without_value`.

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
    tested = [name for name, g in zip(names, groups, strict=True) if name and g["auc"] is not None]
    test = (permutation_test(y, r, v, tested, shared, n_perm=n_boot, seed=seed) if len(tested) >= 2 else None)
    return {"negatives": ALL_NORMAL if shared else WITHIN_GROUP, "groups": groups, "heterogeneity": test,
            "n_without_value": int((v == "").sum() if not shared else (v[y == 1] == "").sum())}


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


def permutation_test(y: np.ndarray, r: np.ndarray, v: np.ndarray, tested: list[str], shared: bool,
                     n_perm: int = 2000, seed: int = 0) -> dict:
    """Whether the `tested` groups' AUCs differ by more than chance: the statistic is the largest group AUC
    minus the smallest, its null distribution that of `n_perm` regroupings that keep each group's class counts
    (tumour slides only, when the groups share the normal slides). p = (1 + regroupings at least as spread) /
    (1 + n_perm), so it is never 0."""
    rng = np.random.default_rng(seed)
    in_test = np.isin(v, tested)
    if shared:  # each tumour slide's placement among all normal slides; a group's AUC is its members' mean
        pos = np.flatnonzero(in_test & (y == 1))
        place, _ = delong_placements(r[pos], r[y == 0])
        code = np.searchsorted(tested, v[pos].astype(str))
        observed = _spread(np.bincount(code, place) / np.bincount(code))
        counts = np.bincount(code)
        spreads = np.empty(n_perm)
        for b in range(n_perm):
            perm = rng.permutation(code)
            spreads[b] = _spread(np.bincount(perm, place) / counts)
    else:
        idx = np.flatnonzero(in_test)
        yy, rr, code = y[idx], r[idx], np.searchsorted(tested, v[idx].astype(str))
        observed = _spread(_group_aucs(yy, rr, code, len(tested)))
        by_class = [np.flatnonzero(yy == c) for c in (0, 1)]
        spreads = np.empty(n_perm)
        for b in range(n_perm):
            perm = code.copy()
            for members in by_class:  # regroup within each class: every group keeps its tumour and normal counts
                perm[members] = rng.permutation(code[members])
            spreads[b] = _spread(_group_aucs(yy, rr, perm, len(tested)))
    extreme = int((spreads >= observed - 1e-12).sum())  # ties count as at least as spread
    return {"test": "permutation", "statistic": "largest group AUC minus smallest", "value": float(observed),
            "p": (1 + extreme) / (1 + n_perm), "permutations": int(n_perm), "seed": int(seed),
            "groups": list(tested)}


def _group_aucs(y: np.ndarray, r: np.ndarray, code: np.ndarray, k: int) -> np.ndarray:
    return np.array([roc_auc(y[code == g], r[code == g]) for g in range(k)])


def _spread(aucs: np.ndarray) -> float:
    return float(aucs.max() - aucs.min())


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
        test = block["heterogeneity"]
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity (false-positive rate)",
               ylabel="sensitivity (true-positive rate)", aspect="equal")
        against = ", against all normal slides" if block["negatives"] == ALL_NORMAL else ""
        p = "" if test is None else f"; permutation p = {test['p']:.3g}"
        ax.set_title(f"ROC by {column}{against}{p}", fontsize=9)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    atomic_write_figure(path, fig)
