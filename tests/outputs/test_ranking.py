"""metrics.json's ranking figures beyond the AUC (`outputs.ranking`) and the predictive values at the threshold."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from wsi_vssm.outputs.ranking import SPECIFICITIES, average_precision, ranking_metrics
from wsi_vssm.outputs.report import bootstrap_auc_ci, operating_point, resampled_aucs, stratified_resamples


def _cohort(seed=0, n1=30, n0=50):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n1), np.zeros(n0)].astype(int)
    z = rng.normal(size=y.size) + 1.5 * y
    return y, z, 1 / (1 + np.exp(-z))


def _sens_at_spec_by_search(y, r, s):
    """The highest sensitivity of any threshold `score >= t` whose specificity is at least s."""
    best = 0.0
    for t in np.r_[np.unique(r), np.inf]:
        called = r >= t
        if (~called[y == 0]).mean() >= s - 1e-12:
            best = max(best, called[y == 1].mean())
    return best


def _ap_by_definition(y, s):
    total = 0.0
    previous_recall = 0.0
    for t in np.unique(s)[::-1]:
        called = s >= t
        recall = (called & (y == 1)).sum() / y.sum()
        total += (recall - previous_recall) * (called & (y == 1)).sum() / called.sum()
        previous_recall = recall
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sensitivity_at_specificity_is_the_best_threshold_meeting_it(seed):
    y, z, _ = _cohort(seed)
    z = np.round(z, 1)  # ties, as rounded scores have
    p = 1 / (1 + np.exp(-z))
    m = ranking_metrics(y, z, p, n_boot=200)
    for s in SPECIFICITIES:
        at = m["sensitivity_at_specificity"][f"{s:.2f}"]
        assert at["sensitivity"] == pytest.approx(_sens_at_spec_by_search(y, z, s))
        assert at["sensitivity_ci95"][0] <= at["sensitivity_ci95"][1]
        if at["threshold"] is not None:  # the probability threshold reproduces the operating point
            called = p >= at["threshold"]
            assert (~called[y == 0]).mean() >= s and called[y == 1].mean() == pytest.approx(at["sensitivity"])


def test_average_precision_follows_its_definition_with_ties():
    assert average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8333333)  # scikit-learn's doc
    y, z, _ = _cohort(3)
    z = np.round(z, 1)
    assert average_precision(y, z) == pytest.approx(_ap_by_definition(y, z))
    if importlib.util.find_spec("sklearn") is not None:
        from sklearn.metrics import average_precision_score

        assert average_precision(y, z) == pytest.approx(average_precision_score(y, z))


def test_the_intervals_are_drawn_from_the_auc_bootstraps_own_resamples():
    y, z, p = _cohort(4, n1=12, n0=9)
    pos, neg = np.sort(z[y == 1]), np.sort(z[y == 0])
    aucs = np.concatenate([resampled_aucs(pos, neg, pi, ni) for _, pi, ni in stratified_resamples(12, 9, 300)])
    assert list(np.quantile(aucs, [0.025, 0.975])) == list(bootstrap_auc_ci(y, z, n_boot=300))
    aps = [average_precision(np.r_[np.ones(12), np.zeros(9)], np.r_[pos[pi[b]], neg[ni[b]]])
           for _, pi, ni in stratified_resamples(12, 9, 300) for b in range(pi.shape[0])]
    expected = np.quantile(aps, [0.025, 0.975])  # by sorting each resample; counting sums in another order
    assert ranking_metrics(y, z, p, n_boot=300)["average_precision_ci95"] == pytest.approx(expected, rel=1e-12)


def test_one_class_gives_no_figures():
    m = ranking_metrics([1, 1, 1], [0.2, 0.5, 0.9])
    assert m["average_precision"] is None and m["prevalence"] == 1.0
    assert set(m["sensitivity_at_specificity"].values()) == {None}
    assert ranking_metrics([], [])["prevalence"] is None


def test_predictive_values_and_f1_at_the_threshold():
    y = [1, 1, 1, 0, 0, 0, 0]
    s = [0.9, 0.8, 0.2, 0.7, 0.1, 0.1, 0.3]  # at 0.5: tp 2, fn 1, fp 1, tn 3
    m = operating_point(y, s, 0.5)
    assert (m["ppv"], m["npv"], m["f1"]) == pytest.approx((2 / 3, 3 / 4, 4 / 6))
    assert m["ppv_ci95"][0] < 2 / 3 < m["ppv_ci95"][1] and m["npv_ci95"][0] < 0.75 < m["npv_ci95"][1]
    none_called = operating_point(y, s, 0.95)
    assert none_called["ppv"] is None and none_called["ppv_ci95"] is None and none_called["f1"] == 0.0


def test_the_summary_line_quotes_the_figures_and_leaves_out_what_one_class_cannot_have():
    from wsi_vssm.outputs.report_text import ranking_line

    y, z, p = _cohort(5)
    m = ranking_metrics(y, z, p, n_boot=200)
    line = ranking_line(m)
    ap, (lo, hi) = m["average_precision"], m["average_precision_ci95"]
    assert line.startswith(f"average precision {ap:.3f} (95% CI {lo:.3f}-{hi:.3f}; a random ranking gives about 0.38)")
    assert line.endswith("at specificity 0.90 / 0.95 / 0.99")
    assert ranking_line(ranking_metrics([1, 1], [0.1, 0.2])) is None and ranking_line({}) is None


def test_a_threshold_probabilities_cannot_reproduce_is_left_out_and_the_logit_given():
    """The review's case: tumour logits 39-42 over a normal at 38 all round to probability 1.0, so `p >= 1.0`
    called that normal slide too (specificity 0.90 where 0.95 was said)."""
    y = np.r_[np.ones(4), np.zeros(10)].astype(int)
    z = np.r_[39.0, 40.0, 41.0, 42.0, 38.0, np.linspace(-5, 0, 9)]
    p = 1 / (1 + np.exp(-z))
    at = ranking_metrics(y, z, p, n_boot=100)["sensitivity_at_specificity"]["0.95"]
    assert at["sensitivity"] == 1.0 and at["rank_threshold"] == 39.0 and at["threshold"] is None
    at90 = ranking_metrics(y, z, p, n_boot=100)["sensitivity_at_specificity"]["0.90"]
    assert at90["rank_threshold"] == 38.0 and at90["threshold"] == 1.0  # 1.0 does give this point: kept
