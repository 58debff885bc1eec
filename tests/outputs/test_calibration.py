"""Calibration figures (wsi_vssm.outputs.calibration): ECE, its interval, the floor of a calibrated model, the
reliability diagram."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsi_vssm.outputs.calibration import (
    bootstrap_ece_ci,
    calibration_png,
    calibration_summary,
    ece_if_calibrated,
    expected_calibration_error,
    reliability_bins,
)


def test_ece_by_hand():
    # bins [0.1, 0.2): p 0.1, 0.1 with labels 0, 1 -> |0.5 - 0.1| x 2/4; bin [0.9, 1]: p 0.9, 1.0, labels 1, 1
    # -> |1 - 0.95| x 2/4
    y, p = [0, 1, 1, 1], [0.1, 0.1, 0.9, 1.0]
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.4 + 0.5 * 0.05)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
    assert expected_calibration_error([1, 0], [0.0, 1.0]) == 1.0
    assert expected_calibration_error([0, 1], [0.14, 0.16]) == pytest.approx(0.35)  # one bin [0.1, 0.2), not two
    # one item at 0.96: its ECE is 0.04 with probability 0.96, else 0.96; the 5-95% range is [0.04, 0.04]
    assert ece_if_calibrated([0.96], n_sim=2000)["range90"] == pytest.approx([0.04, 0.04])
    assert np.isnan(expected_calibration_error([1], [np.nan]))  # non-finite probabilities are left out
    rows = reliability_bins(y, p)
    assert [(r["low"], r["n"]) for r in rows] == [(0.1, 2), (0.9, 2)]
    assert rows[0]["positive_share"] == 0.5 and rows[1]["mean_probability"] == pytest.approx(0.95)
    with pytest.raises(ValueError, match="differ in length"):
        expected_calibration_error([0, 1], [0.5])


def test_floor_of_a_calibrated_model_shrinks_with_cohort_size():
    rng = np.random.default_rng(1)
    small, large = ece_if_calibrated(rng.random(40)), ece_if_calibrated(rng.random(4000))
    assert small["range90"][0] <= small["median"] <= small["range90"][1]
    assert large["median"] < 0.5 * small["median"]  # about 1 / sqrt(n)
    # probabilities at 0 and 1 leave nothing to chance: the floor is exactly 0
    assert ece_if_calibrated([0.0, 1.0, 1.0, 0.0]) == {"median": 0.0, "range90": [0.0, 0.0]}
    assert ece_if_calibrated([np.nan]) is None


def test_calibrated_labels_fall_inside_the_floor_and_miscalibrated_ones_do_not():
    rng = np.random.default_rng(2)
    p = rng.random(300)
    floor = ece_if_calibrated(p, seed=5)
    honest = (rng.random(300) < p).astype(int)  # labels drawn from the probabilities: calibrated by construction
    shifted = (rng.random(300) < p ** 3).astype(int)  # the model says p, the truth is p^3
    assert expected_calibration_error(honest, p) <= floor["range90"][1]
    assert expected_calibration_error(shifted, p) > floor["range90"][1]
    lo, hi = bootstrap_ece_ci(shifted, p, n_boot=300)
    assert lo <= expected_calibration_error(shifted, p) <= hi
    assert bootstrap_ece_ci(shifted, p, n_boot=300) == (lo, hi)  # seeded


def test_the_ece_interval_holds_its_estimate_on_a_well_calibrated_sample():
    """A resample's ECE is biased upward: on calibrated labels the plain percentile interval lay wholly above
    the estimate in 4 of these 20 samples (an evaluate run printed "ECE 0.044 (95% CI 0.047-0.104)")."""
    rng = np.random.default_rng(7)
    inside = 0
    for _ in range(20):
        p = rng.beta(0.3, 0.3, 200)  # a confident model's probabilities, piled near 0 and 1
        y = (rng.random(200) < p).astype(int)
        lo, hi = bootstrap_ece_ci(y, p, n_boot=300)
        inside += lo <= expected_calibration_error(y, p) <= hi
        assert 0.0 <= lo <= hi
    assert inside >= 19, inside


def test_the_ece_interval_stays_within_0_and_1():
    """On a few items the bootstrap bias can be negative, and the shifted interval passed 1 (an evaluate run of 4
    slides printed "ECE 0.494 (95% CI 0.057-1.045)")."""
    p, y = np.array([0.529, 0.994, 0.882, 0.958]), np.array([1, 0, 1, 0])
    lo, hi = bootstrap_ece_ci(y, p, n_boot=200)
    assert 0.0 <= lo <= expected_calibration_error(y, p) <= hi == 1.0


def test_summary_and_png(tmp_path):
    rng = np.random.default_rng(3)
    p = rng.random(50)
    y = (rng.random(50) < p).astype(int)
    s = calibration_summary(y, p, n_boot=100)
    assert list(s) == ["bins", "ece", "ece_ci95", "ece_if_calibrated", "reliability", "brier", "brier_ci95",
                       "intercept", "intercept_ci95", "slope", "slope_ci95", "recalibration_reason"]
    assert s["recalibration_reason"] is None and s["slope"] is not None
    assert s["ece"] == pytest.approx(expected_calibration_error(y, p))
    assert sum(r["n"] for r in s["reliability"]) == 50
    calibration_png(tmp_path / "c.png", y, p, s)
    assert Image.open(tmp_path / "c.png").size == (1350, 1350)  # 4.5 inches at 300 dpi
    empty = calibration_summary([], [])
    assert empty["ece"] is None and empty["ece_ci95"] is None and empty["reliability"] == []
    assert empty["brier"] is None and empty["slope"] is None and list(empty) == list(s)
    calibration_png(tmp_path / "e.png", [], [], empty)  # an empty cohort still gets a diagram that says so
    assert (tmp_path / "e.png").stat().st_size > 1000


def test_the_legend_covers_no_bin():
    """The legend sat in the upper-left corner of the axes, over a bin at (0.18, 1.0) of a 10-slide cohort;
    bins at 0 or 1 sat on the frame."""
    from wsi_vssm.outputs.calibration import calibration_figure

    y, p = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1], [0.05, 0.07, 0.06, 0.46, 0.95, 0.18, 0.99, 0.98, 0.97, 0.06]
    fig = calibration_figure(y, p)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend, frame = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.y1 <= frame.y0, (legend, frame)  # under the axes, not on them
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    assert x0 < 0 and x1 > 1 and y0 < 0 and y1 > 1  # a margin round the unit square


@pytest.mark.parametrize("labels, probs, said", [
    ([1, 0], [1.5, -0.5], r"probabilities must lie in \[0, 1\]; got 1\.5"),
    ([2, 0], [0.5, 0.5], r"labels must be 0 or 1; got 2"),
])
def test_the_ece_refuses_what_is_not_a_probability_or_a_label(labels, probs, said):
    """A logit or a percentage passed for a probability gave an ECE with bin means of 1.5 and -0.5."""
    with pytest.raises(ValueError, match=said):
        expected_calibration_error(labels, probs)


def test_bins_hold_floor_of_ten_p_so_exact_tenths_fall_in_the_bin_above():
    rows = reliability_bins([0, 1, 1], [0.0, 0.7, 1.0])
    assert [(r["low"], r["n"]) for r in rows] == [(0.0, 1), (0.7, 1), (0.9, 1)]


def test_calibration_slope_and_intercept_recover_a_known_miscalibration():
    """The slope is the logistic regression of the labels on logit p; the intercept holds the slope at 1."""
    from wsi_vssm.outputs.calibration import logistic_recalibration

    rng = np.random.default_rng(0)
    z = rng.normal(size=20000) * 1.5
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(int)
    exact = logistic_recalibration(y, 1 / (1 + np.exp(-z)))
    assert abs(exact["slope"] - 1) < 0.05 and abs(exact["intercept"]) < 0.05
    assert exact["slope_ci95"][0] < exact["slope"] < exact["slope_ci95"][1]
    overconfident = logistic_recalibration(y, 1 / (1 + np.exp(-2 * z)))
    assert abs(overconfident["slope"] - 0.5) < 0.03  # too extreme: slope below 1
    too_high = logistic_recalibration(y, 1 / (1 + np.exp(-(z + 1))))
    assert abs(too_high["intercept"] + 1) < 0.06  # every probability too high: intercept below 0
    # the maximum likelihood solves the score equations: with the slope's own intercept (from the first), the
    # residuals weighted by the logits sum to zero too; and the intercept's residuals with the slope at 1
    from scipy.optimize import brentq

    p = 1 / (1 + np.exp(-(0.7 * z - 0.3)))
    fit = logistic_recalibration(y, p)
    zz = np.log(p) - np.log1p(-p)
    a = brentq(lambda a: np.sum(y - 1 / (1 + np.exp(-(a + fit["slope"] * zz)))), -20, 20)
    assert abs(np.sum((y - 1 / (1 + np.exp(-(a + fit["slope"] * zz)))) * zz)) < 1e-6
    assert abs(np.sum(y - 1 / (1 + np.exp(-(fit["intercept"] + zz))))) < 1e-6


def test_no_finite_slope_is_said_and_the_brier_score_is_the_mean_squared_error():
    from wsi_vssm.outputs.calibration import calibration_summary, logistic_recalibration

    separated = logistic_recalibration([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert separated["slope"] is None and "separate the classes completely" in separated["recalibration_reason"]
    assert separated["intercept"] == pytest.approx(0.0, abs=1e-9)  # the mean probability matches: 0.5 each
    assert logistic_recalibration([1, 1], [0.5, 0.6])["recalibration_reason"] == "needs both classes"
    y, p = [0, 1, 1, 0, 1], [0.2, 0.7, 0.4, 0.1, 0.9]
    s = calibration_summary(y, p, n_boot=300)
    assert s["brier"] == pytest.approx(np.mean((np.array(p) - np.array(y)) ** 2))
    assert s["brier_ci95"][0] <= s["brier"] <= s["brier_ci95"][1]
    assert calibration_summary(y[::-1], p[::-1], n_boot=300)["brier_ci95"] == s["brier_ci95"]  # order-free


def test_the_summary_line_gives_the_brier_score_slope_and_intercept_or_why_not():
    from wsi_vssm.outputs.report_text import recalibration_words

    rng = np.random.default_rng(1)
    p = rng.random(200)
    y = (rng.random(200) < p).astype(int)
    s = calibration_summary(y, p, n_boot=100)
    words = recalibration_words(s)
    assert words.startswith(f"Brier {s['brier']:.3f} (95% CI {s['brier_ci95'][0]:.3f} to ")
    assert f"; slope {s['slope']:.2f} (95% CI " in words and words.endswith("(calibrated: slope 1, intercept 0)")
    separated = recalibration_words(calibration_summary([0, 1], [0.2, 0.9], n_boot=100))
    assert "; slope n/a (no finite slope: the probabilities separate the classes completely" in separated
    assert recalibration_words(calibration_summary([], [])) == "slope n/a (needs both classes)"
