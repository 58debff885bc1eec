"""Subgroup figures (`outputs.subgroups`): each group's AUC and operating point, the shared-negatives rule for a
column given on tumour slides only, and the permutation test of the groups' difference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsi_vssm.outputs.report import bootstrap_auc_ci, roc_auc
from wsi_vssm.outputs.report_text import ALL_NORMAL, WITHIN_GROUP, subgroup_lines
from wsi_vssm.outputs.subgroups import delong_heterogeneity, permutation_test, subgroup_metrics, subgroups_png


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
    assert block["heterogeneity"]["test"] == "permutation" and block["heterogeneity"]["untested"] == []
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


def _delong_variance_by_kernel(pos, neg):
    """DeLong's variance from the O(mn) kernel, as the 1988 paper writes it: the check on the placements."""
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return psi.mean(axis=1).var(ddof=1) / pos.size + psi.mean(axis=0).var(ddof=1) / neg.size


def test_independent_groups_are_compared_by_delongs_chi_square():
    y, p, logit, v = _two_centres(seed=2, n=40, shift_b=0.0)  # B's scores carry no signal
    test = subgroup_metrics(y, p, v, threshold=0.5, n_boot=200, ranks=logit)["heterogeneity"]
    aucs = [roc_auc(y[v == c], logit[v == c]) for c in "AB"]
    var = sum(_delong_variance_by_kernel(logit[(v == c) & (y == 1)], logit[(v == c) & (y == 0)]) for c in "AB")
    assert test["test"] == "DeLong chi-square" and test["df"] == 1 and test["untested"] == []
    assert test["value"] == pytest.approx((aucs[0] - aucs[1]) ** 2 / var)
    assert test["p"] == pytest.approx(math.erfc(math.sqrt(test["value"] / 2))) and test["p"] < 0.001
    y, p, logit, v = _two_centres(seed=3, n=40, shift_b=2.5)  # the same signal in both centres
    assert subgroup_metrics(y, p, v, threshold=0.5, n_boot=200, ranks=logit)["heterogeneity"]["p"] > 0.2


def test_a_centre_whose_scores_all_sit_higher_is_no_difference():
    """The review's case: a permutation over both centres' slides took a shift of one centre's scores (which
    leaves its AUC as it is) for a difference (p 0.038 against 0.29 for the same AUCs)."""
    y, p, logit, v = _two_centres(seed=5, n=30, shift_b=1.0)
    before = subgroup_metrics(y, p, v, threshold=0.5, n_boot=200, ranks=logit)["heterogeneity"]
    shifted = logit + 3.0 * (v == "B")
    after = subgroup_metrics(y, 1 / (1 + np.exp(-shifted)), v, threshold=0.5, n_boot=200,
                             ranks=shifted)["heterogeneity"]
    assert after["value"] == pytest.approx(before["value"]) and after["p"] == pytest.approx(before["p"])


def test_the_chi_square_holds_its_level_on_alike_groups():
    """Over 100 cohorts whose two groups are alike by construction: about 5 rejections at p < 0.05 (a test that
    always said p = 1 fails the lower bound, one that always rejected the upper)."""
    rejected = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        y = np.tile(np.r_[np.ones(20), np.zeros(20)], 2).astype(int)
        v = np.array(["A"] * 40 + ["B"] * 40, dtype=object)
        rejected += delong_heterogeneity(y, rng.normal(size=80) + y, v, ["A", "B"])["p"] < 0.05  # AUC 0.76 both
    assert 1 <= rejected <= 12, rejected


def test_a_group_too_small_to_weigh_is_named_and_does_not_decide_the_test():
    """The review's case: a group of one tumour and one normal slide at AUC 0 made the AUC range 0.78."""
    y, p, logit, v = _two_centres(seed=6, n=40, shift_b=2.5)
    y, logit = np.r_[y, 1, 0], np.r_[logit, -3.0, 3.0]
    v = np.concatenate([v, np.array(["C", "C"], dtype=object)])
    block = subgroup_metrics(y, 1 / (1 + np.exp(-logit)), v, threshold=0.5, n_boot=200, ranks=logit)
    test = block["heterogeneity"]
    assert test["groups"] == ["A", "B"] and test["untested"] == ["C"]
    assert test["p"] == delong_heterogeneity(y, logit, v, ["A", "B"])["p"]  # as if C were not there
    assert block["groups"][2]["auc"] == 0.0  # still reported, with its counts


def test_two_perfect_groups_leave_the_test_undefined_and_say_why():
    y = np.r_[np.ones(3), np.zeros(3), np.ones(3), np.zeros(3)].astype(int)
    v = np.array(["A"] * 6 + ["B"] * 6, dtype=object)
    s = y * 2.0 + np.r_[0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.1, 0.2, 0.3]
    test = subgroup_metrics(y, s, v, threshold=1.0, n_boot=100)["heterogeneity"]
    assert test["p"] is None and "AUC 0 or 1" in test["reason"]
    assert "DeLong chi-square undefined (two or more groups" in subgroup_lines({"c": {
        "negatives": "within group", "groups": [], "heterogeneity": test}})[0]


def test_a_column_on_most_tumour_slides_and_one_normal_slide_is_explained():
    """The review's case: Macro / Micro with one normal row written `None` turned every group into n/a."""
    y = np.r_[np.ones(8), np.zeros(6)].astype(int)
    v = np.array(["Macro"] * 4 + ["Micro"] * 4 + ["None"] + [""] * 5, dtype=object)
    block = subgroup_metrics(y, np.linspace(0, 1, 14), v, threshold=0.5, n_boot=100)
    assert block["negatives"] == WITHIN_GROUP and all(g["auc"] is None for g in block["groups"][:3])
    note = block["note"]
    assert note.startswith("3 of 3 groups hold one class only") and "1 normal slide(s) have a value" in note


def test_the_shared_negatives_test_weighs_the_groups_by_their_tumour_slides():
    rng = np.random.default_rng(4)
    y = np.r_[np.ones(15), np.zeros(10)].astype(int)
    v = np.array(["x"] * 5 + ["y"] * 10 + [""] * 10, dtype=object)
    s = rng.normal(size=25) + y
    test = permutation_test(y, s, v, ["x", "y"], n_perm=50)
    aucs = np.array([roc_auc(y[(v == g) | (y == 0)], s[(v == g) | (y == 0)]) for g in ("x", "y")])
    mean = (5 * aucs[0] + 10 * aucs[1]) / 15
    assert test["value"] == pytest.approx((5 * (aucs[0] - mean) ** 2 + 10 * (aucs[1] - mean) ** 2) / 15)
    assert 1 / 51 <= test["p"] <= 1


def test_one_group_gives_no_test_and_the_figure_draws_what_it_can(tmp_path):
    y, p, logit, v = _two_centres(n=8)
    v = np.array(["A"] * y.size, dtype=object)
    block = subgroup_metrics(y, p, v, threshold=0.5, n_boot=100)
    assert block["heterogeneity"] is None and "groups differ" not in subgroup_lines({"site": block})[0]
    subgroups_png(tmp_path / "r.png", y, p, {"site": v}, {"site": block})
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
