"""Subgroup figures (`outputs.subgroups`): each group's AUC and operating point, the shared-negatives rule for a
column given on tumour slides only, and the permutation test of the groups' difference."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_vssm.outputs.report import bootstrap_auc_ci, roc_auc
from wsi_vssm.outputs.report_text import subgroup_lines
from wsi_vssm.outputs.subgroups import (
    ALL_NORMAL,
    WITHIN_GROUP,
    permutation_test,
    subgroup_metrics,
    subgroups_png,
)


def _two_centres(seed=0, n=30, shift_b=1.5):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n), np.zeros(n), np.ones(n), np.zeros(n)].astype(int)
    v = np.array(["A"] * (2 * n) + ["B"] * (2 * n), dtype=object)
    s = rng.normal(size=4 * n) + y * np.where(v == "A", 2.5, shift_b)
    return y, 1 / (1 + np.exp(-s)), s, v


def test_each_centre_gets_the_figures_of_its_own_slides():
    y, p, logit, v = _two_centres()
    block = subgroup_metrics(y, p, v, threshold=0.5, n_boot=300, ranks=logit)
    assert block["negatives"] == WITHIN_GROUP and block["n_without_value"] == 0
    assert [g["value"] for g in block["groups"]] == ["A", "B"]
    for g in block["groups"]:
        m = v == g["value"]
        assert g["auc"] == pytest.approx(roc_auc(y[m], logit[m]))
        assert g["auc_ci95"] == pytest.approx(list(bootstrap_auc_ci(y[m], logit[m], n_boot=300)))
        assert (g["n_tumour"], g["n_normal"]) == (int(y[m].sum()), int((y[m] == 0).sum()))
        tp = int(((p[m] >= 0.5) & (y[m] == 1)).sum())
        assert g["sensitivity"] == pytest.approx(tp / g["n_tumour"])
        assert g["sensitivity_ci95"][0] <= g["sensitivity"] <= g["sensitivity_ci95"][1]
    assert block["groups"][0]["auc"] != block["groups"][1]["auc"]


def test_a_column_given_on_tumour_slides_only_ranks_each_against_all_normal_slides():
    """CAMELYON16's Macro / Micro: normal slides have no value; each group's tumour slides against all of them."""
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(20), np.zeros(25)].astype(int)
    v = np.array(["Macro"] * 12 + ["Micro"] * 8 + [""] * 25, dtype=object)
    s = rng.normal(size=45) + np.where(v == "Macro", 3.0, np.where(v == "Micro", 0.8, 0.0))
    block = subgroup_metrics(y, s, v, threshold=0.0, n_boot=200)
    assert block["negatives"] == ALL_NORMAL and block["n_without_value"] == 0
    for g in block["groups"]:
        m = (v == g["value"]) | (y == 0)
        assert g["n_normal"] == 25 and g["auc"] == pytest.approx(roc_auc(y[m], s[m]))
        assert g["specificity"] == pytest.approx(((s[y == 0] < 0.0).sum()) / 25)
    macro, micro = block["groups"]
    assert macro["auc"] > micro["auc"]
    assert block["heterogeneity"]["p"] < 0.05  # micro-metastases are harder: the groups differ
    assert "(each against all normal slides)" in subgroup_lines({"type": block})[0]


def test_slides_without_a_value_are_a_group_of_their_own_never_dropped():
    y, p, logit, v = _two_centres(n=10)
    v = v.copy()
    v[:3] = ""  # three tumour slides of centre A with no centre written
    block = subgroup_metrics(y, p, v, threshold=0.5, n_boot=200)
    assert [g["value"] for g in block["groups"]] == ["A", "B", None] and block["n_without_value"] == 3
    none = block["groups"][2]
    assert (none["n_tumour"], none["n_normal"], none["auc"]) == (3, 0, None)
    assert "the group has 3 tumour and 0 normal slides" in none["reason"]
    assert none["specificity"] is None and none["specificity_ci95"] is None
    assert block["heterogeneity"]["groups"] == ["A", "B"]  # the valueless group is not tested
    assert sum(g["n_tumour"] + g["n_normal"] for g in block["groups"]) == y.size


def test_the_permutation_test_finds_a_real_difference_and_none_where_there_is_none():
    y, p, logit, v = _two_centres(seed=2, n=40, shift_b=0.0)  # B's scores carry no signal
    differ = subgroup_metrics(y, p, v, threshold=0.5, n_boot=500, ranks=logit)["heterogeneity"]
    assert differ["p"] <= 0.01 and differ["value"] > 0.3
    assert differ["p"] >= 1 / 501  # counted with the observed grouping: never 0
    y, p, logit, v = _two_centres(seed=3, n=40, shift_b=2.5)  # the same signal in both centres
    alike = subgroup_metrics(y, p, v, threshold=0.5, n_boot=500, ranks=logit)["heterogeneity"]
    assert alike["p"] > 0.2
    assert alike["value"] == pytest.approx(abs(np.subtract(*[roc_auc(y[v == c], logit[v == c]) for c in "AB"])))


def test_the_null_holds_its_level_on_alike_groups():
    """Over cohorts where the groups are alike by construction, p < 0.05 about 5% of the time."""
    rejected = 0
    for seed in range(60):
        y, p, logit, v = _two_centres(seed=100 + seed, n=12, shift_b=2.5)
        test = permutation_test(y, logit, v, ["A", "B"], shared=False, n_perm=199, seed=seed)
        rejected += test["p"] < 0.05
    assert rejected <= 8  # 3 expected; binomial(60, 0.05) exceeds 8 with probability under 0.5%


def test_the_shared_fast_path_matches_the_group_aucs_it_permutes():
    rng = np.random.default_rng(4)
    y = np.r_[np.ones(15), np.zeros(10)].astype(int)
    v = np.array(["x"] * 5 + ["y"] * 10 + [""] * 10, dtype=object)
    s = rng.normal(size=25) + y
    test = permutation_test(y, s, v, ["x", "y"], shared=True, n_perm=50)
    aucs = [roc_auc(y[(v == g) | (y == 0)], s[(v == g) | (y == 0)]) for g in ("x", "y")]
    assert test["value"] == pytest.approx(max(aucs) - min(aucs))


def test_one_group_gives_no_test_and_the_figure_draws_what_it_can(tmp_path):
    y, p, logit, v = _two_centres(n=8)
    v = np.array(["A"] * y.size, dtype=object)
    block = subgroup_metrics(y, p, v, threshold=0.5, n_boot=100)
    assert block["heterogeneity"] is None and "permutation" not in subgroup_lines({"site": block})[0]
    subgroups_png(tmp_path / "r.png", y, p, {"site": v}, {"site": block})
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
