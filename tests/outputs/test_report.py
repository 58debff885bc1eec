"""Cohort report (AUC, bootstrap CI, metrics, ROC plot, predictions table) and the CAMELYON16 FROC."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import MultiPolygon, Point, box

from wsi_vssm.atomic import atomic_write_json
from wsi_vssm.errors import UsageError
from wsi_vssm.io.annotations import AnnotationSet
from wsi_vssm.outputs.froc import (
    FP_RATES,
    detections_from_heatmap,
    froc,
    interpolate_curve,
    lesion_regions,
    major_axis_length,
)
from wsi_vssm.outputs.report import (
    METRIC_KEYS,
    PREDICTION_KEYS,
    bootstrap_auc_ci,
    cohort_metrics,
    delong_auc_ci,
    metrics_at_threshold,
    read_predictions_csv,
    roc_auc,
    roc_curve,
    roc_png,
    write_prediction_json,
    write_predictions_csv,
)


def _brute_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


# ---- AUC -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = rng.integers(0, 6, n) / 5.0  # few distinct values: many ties
    assert roc_auc(y, s) == pytest.approx(_brute_auc(y, s), abs=1e-12)


@pytest.mark.parametrize("shape, axis", [((0,), -1), ((1,), -1), ((9,), -1), ((60,), 0), ((4, 30), 1),
                                         ((30, 4), 0), ((3, 0), 1)])
def test_rankdata_gives_scipys_average_ranks(shape, axis):
    """report.rankdata stands in for scipy.stats.rankdata, whose import alone cost `evaluate` about a second."""
    from scipy.stats import rankdata as scipy_rankdata

    from wsi_vssm.outputs.report import rankdata

    rng = np.random.default_rng(sum(shape))
    for x in (rng.normal(size=shape), rng.integers(0, 4, size=shape).astype(float)):  # distinct, and many ties
        assert np.array_equal(rankdata(x, axis=axis), scipy_rankdata(x, axis=axis)), x


def test_the_report_module_does_not_load_scipy_stats():
    import subprocess
    import sys

    code = "import sys, wsi_vssm.outputs.report\nprint(sorted(m for m in sys.modules if m.startswith('scipy.stats')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_auc_matches_sklearn_when_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200), 1)
    assert roc_auc(y, s) == pytest.approx(metrics.roc_auc_score(y, s))


def test_auc_edge_cases():
    assert roc_auc([0, 1], [0.2, 0.9]) == 1.0
    assert roc_auc([0, 1], [0.9, 0.2]) == 0.0
    assert roc_auc([0, 0, 1, 1], [0.5] * 4) == 0.5
    for labels, scores, match in [
        ([1, 1], [0.2, 0.3], "both classes"),
        ([0, 2], [0.2, 0.3], "0 or 1"),
        ([0, 1], [0.2], "1 scores"),
        ([0, 1], [0.2, float("nan")], "finite"),
    ]:
        with pytest.raises(UsageError, match=match):
            roc_auc(labels, scores)


def test_roc_curve_area_equals_auc():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    s = rng.integers(0, 10, 80).astype(float)
    fpr, tpr, thr = roc_curve(y, s)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and np.isinf(thr[0])
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 (the declared floor is 1.25)
    assert trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, s))  # ties as diagonal steps


def test_bootstrap_ci_contains_auc_and_is_deterministic():
    rng = np.random.default_rng(7)
    y = np.r_[np.zeros(40, int), np.ones(25, int)]
    s = np.r_[rng.normal(0, 1, 40), rng.normal(1.2, 1, 25)]
    auc = roc_auc(y, s)
    lo, hi = bootstrap_auc_ci(y, s, n_boot=1000, seed=0)
    assert 0 <= lo < auc < hi <= 1
    assert (lo, hi) == bootstrap_auc_ci(y, s, n_boot=1000, seed=0)
    assert (lo, hi) != bootstrap_auc_ci(y, s, n_boot=1000, seed=1)
    lo90, hi90 = bootstrap_auc_ci(y, s, n_boot=1000, seed=0, alpha=0.1)
    assert lo <= lo90 and hi90 <= hi
    # Resampling is stratified: even a single positive slide appears in every resample (no failure).
    one = bootstrap_auc_ci([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.9], n_boot=50)
    assert one == (1.0, 1.0)


# ---- metrics -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_delong_interval_matches_its_pairwise_definition(seed):
    """DeLong's variance from the pairwise kernel (ties one half), logit interval mapped back, computed here
    without ranks."""
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    m, n = (int(v) for v in rng.integers(2, 40, 2))
    pos, neg = np.round(rng.normal(1, 1, m), 1), np.round(rng.normal(0, 1, n), 1)  # rounded: ties
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = psi.mean()
    se = np.sqrt(psi.mean(1).var(ddof=1) / m + psi.mean(0).var(ddof=1) / n) / (auc * (1 - auc))
    logit, z = np.log(auc / (1 - auc)), norm.ppf(0.975)
    want = 1 / (1 + np.exp(-(logit - z * se))), 1 / (1 + np.exp(-(logit + z * se)))
    labels, scores = np.r_[np.ones(m, int), np.zeros(n, int)], np.r_[pos, neg]
    got = delong_auc_ci(labels, scores)
    assert got == pytest.approx(want, abs=1e-12)
    order = rng.permutation(m + n)
    assert delong_auc_ci(labels[order], scores[order]) == pytest.approx(got, abs=1e-12)  # order-free


def test_delong_interval_is_none_where_undefined():
    assert delong_auc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) is None  # AUC 1: no variance to measure
    assert delong_auc_ci([0, 0, 1], [0.1, 0.5, 0.9]) is None  # one positive: no variance across positives
    assert delong_auc_ci([1, 1, 1, 0, 0, 0], [0.7] * 6) is None  # all tied: it said [0.5, 0.5], as if certain
    assert delong_auc_ci([0, 0, 0, 1], [0.1, 0.5, 0.9, 0.6]) is None  # one positive and an AUC inside (0, 1)


def test_bootstrap_auc_interval_is_at_the_asked_level():
    # One positive (1) and negatives 0 and 2: a resample's negatives are both 0 (AUC 1), both 2 (AUC 0) or one of
    # each (0.5), with probabilities 1/4, 1/4, 1/2. Its 20-80% interval spans [0, 1]; a 40-60% one would be 0.5.
    assert bootstrap_auc_ci([1, 0, 0], [1, 0, 2], n_boot=2000, alpha=0.4) == (0.0, 1.0)
    assert bootstrap_auc_ci([1, 0, 0], [1, 0, 2], n_boot=2000, alpha=0.6) == (0.5, 0.5)


def test_froc_interpolation_on_a_vertical_step_takes_its_top():
    # Two operating points at 0.25 FP per slide (4 slides, one false positive): the higher sensitivity counts.
    assert interpolate_curve(np.array([0, 0.25, 0.25, 0.5]), np.array([0, 0.2, 0.6, 0.8]), 0.25) == 0.6
    lo, hi = delong_auc_ci([0, 0, 1, 1], [0.1, 0.8, 0.2, 0.9])
    assert 0 < lo < 0.75 < hi < 1
    m = cohort_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 0.5, n_boot=100)
    assert m["auc"] == 1.0 and m["auc_ci95"] == [1.0, 1.0] and m["auc_ci95_delong"] is None


def test_metrics_at_threshold_counts():
    m = metrics_at_threshold([0, 0, 1, 1, 1], [0.1, 0.6, 0.5, 0.4, 0.9], 0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)  # score == threshold is positive
    assert m["accuracy"] == 3 / 5 and m["sensitivity"] == 2 / 3 and m["specificity"] == 1 / 2


def test_cohort_metrics_keys_and_values(tmp_path):
    y = [0, 0, 1, 1, 1, 0]
    s = [0.1, 0.6, 0.5, 0.4, 0.9, 0.2]
    m = cohort_metrics(y, s, 0.5, n_failed=2, n_boot=200)
    assert tuple(m) == METRIC_KEYS == (
        "auc", "auc_ci95", "auc_ci95_delong", "accuracy", "sensitivity", "specificity", "threshold", "n", "n_failed",
    )  # fmt: skip
    assert m["auc"] == pytest.approx(_brute_auc(np.array(y), np.array(s)))
    assert len(m["auc_ci95"]) == 2 and m["auc_ci95"][0] <= m["auc"] <= m["auc_ci95"][1]
    assert m["auc_ci95_delong"] == pytest.approx(list(delong_auc_ci(y, s)))
    assert (m["n"], m["n_failed"], m["threshold"]) == (6, 2, 0.5)
    atomic_write_json(tmp_path / "metrics.json", m)
    assert json.loads((tmp_path / "metrics.json").read_text()) == m


def test_cohort_metrics_single_class_gives_null_auc_with_reason():
    m = cohort_metrics([0, 0, 0], [0.1, 0.7, 0.2], 0.5)
    assert m["auc"] is None and m["auc_ci95"] is None and m["auc_ci95_delong"] is None
    assert "both classes" in m["reason"]
    assert m["sensitivity"] is None and m["specificity"] == 2 / 3
    assert list(m) == [*METRIC_KEYS, "reason"]
    empty = cohort_metrics([], [], 0.5, n_failed=3)
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["n_failed"] == 3
    with pytest.raises(UsageError, match="threshold"):
        cohort_metrics([0, 1], [0.1, 0.9], float("nan"))


# ---- files ---------------------------------------------------------------------------------------------------
def test_plot_titles_count_one_item_in_the_singular():
    """A one-slide cohort's ROC was titled "ROC over 1 slides"."""
    from wsi_vssm.outputs.report import _count

    assert (_count(1, "slides"), _count(1, "patches"), _count(2, "slides"), _count(0, "patches")) == (
        "1 slide", "1 patch", "2 slides", "0 patches")


def test_roc_png(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    s = rng.random(50)
    roc_png(tmp_path / "roc.png", y, s, ci=(0.4, 0.6), threshold=0.5)
    roc_png(tmp_path / "one_class.png", [1, 1], [0.3, 0.8])  # says why instead of failing
    for name in ("roc.png", "one_class.png"):
        with Image.open(tmp_path / name) as im:
            # print resolution for a journal column: 4.5 inches at 300 dpi
            assert im.format == "PNG" and im.size == (1350, 1350) and round(im.info["dpi"][0]) == 300
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_zero_width_auc_interval_is_called_undefined():
    """Perfectly separated slides gave "AUC 1.000 (95% CI 1.000-1.000)" in the summary line and the ROC legend, as
    if the AUC were known exactly."""
    from wsi_vssm.outputs.report import interval_text

    m = cohort_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 0.5, n_boot=100)
    assert m["auc_ci95"] == [1.0, 1.0] and "undefined" in interval_text(m["auc_ci95"])
    assert interval_text([0.81, 0.93]) == " (95% CI 0.810-0.930)" and interval_text(None) == ""
    assert interval_text([0.5, 0.5], "score").endswith("every resample gives this score)")


def test_proportion_intervals_are_clopper_pearson_and_the_counts_add_up():
    from scipy.stats import binomtest

    from wsi_vssm.outputs.report import operating_point, proportion_ci

    for k, n in ((0, 1), (1, 1), (3, 10), (10, 10), (37, 40), (0, 25)):
        want = binomtest(k, n).proportion_ci(0.95, method="exact")
        assert proportion_ci(k, n) == pytest.approx([want.low, want.high], abs=1e-9)
    assert proportion_ci(0, 0) is None
    with pytest.raises(UsageError):
        proportion_ci(3, 2)
    point = operating_point([0, 0, 0, 1, 1], [0.1, 0.6, 0.2, 0.7, 0.3], 0.5)
    assert point["confusion"] == {"tp": 1, "fp": 1, "tn": 2, "fn": 1}
    assert (point["n_tumour"], point["n_normal"]) == (2, 3)
    assert point["specificity_ci95"] == pytest.approx(proportion_ci(2, 3))
    assert operating_point([0, 0], [0.1, 0.9], 0.5)["sensitivity_ci95"] is None  # no tumour: undefined


def test_predictions_csv_roundtrip(tmp_path):
    rows = [
        {"slide": "tumor_001", "label": 1, "probability": 0.1 + 0.2, "status": "ok"},
        {"slide": "normal, odd", "label": 0, "probability": 1e-9, "status": "ok"},
        {"slide": "broken", "label": 1, "probability": None, "status": "failed", "error": "bad tile\nat (0, 0)"},
        {"slide": "unlabelled", "probability": 0.5, "status": "ok", "in_domain": False},
        {"slide": "sure", "label": 1, "probability": 1.0, "status": "ok", "logit": 57.38158416748047},
    ]
    path = tmp_path / "predictions.csv"
    write_predictions_csv(path, rows)
    assert path.read_text().splitlines()[0] == "slide,label,probability,status,error,in_domain,logit"
    back = read_predictions_csv(path)
    assert [r["slide"] for r in back] == [r["slide"] for r in rows]
    assert back[0]["probability"] == 0.1 + 0.2  # full precision
    assert back[2] == {
        "slide": "broken",
        "label": 1,
        "probability": None,
        "status": "failed",
        "error": "bad tile at (0, 0)",
        "in_domain": None,
        "logit": None,
    }
    assert back[3]["label"] is None and back[3]["in_domain"] is False
    assert back[4]["logit"] == 57.38158416748047  # full precision
    old = tmp_path / "old.csv"  # a table written before the logit column
    old.write_text("slide,label,probability,status,error,in_domain\nx,1,0.5,done,,true\n")
    assert read_predictions_csv(old)[0]["logit"] is None
    with pytest.raises(UsageError, match="row 0"):
        write_predictions_csv(path, [{"slide": "x"}])
    with pytest.raises(UsageError, match="unknown column"):
        write_predictions_csv(path, [{"slide": "x", "status": "ok", "prob": 1}])
    assert len(read_predictions_csv(path)) == 5  # a failed write left the table as it was


def test_prediction_json_keys(tmp_path):
    record = {
        "slide": "tumor_001", "probability": 0.93, "label": 1, "threshold": 0.5, "reason": None,
        "model": {"name": "micro", "sha256": "ab"}, "mpp": 0.243, "parameters": {"region_px": 10000},
        "timings": {"total_s": float("nan")}, "version": "0.1.0",
    }  # fmt: skip
    write_prediction_json(tmp_path / "prediction.json", dict(reversed(list(record.items()))))
    back = json.loads((tmp_path / "prediction.json").read_text())
    assert tuple(back) == PREDICTION_KEYS and back["timings"]["total_s"] is None
    with pytest.raises(UsageError, match="reason"):
        write_prediction_json(tmp_path / "p.json", {**record, "probability": None})
    with pytest.raises(UsageError, match="unknown keys"):
        write_prediction_json(tmp_path / "p.json", {**record, "extra": 1})
    assert not (tmp_path / "p.json").exists()


# ---- FROC ----------------------------------------------------------------------------------------------------
def test_major_axis_length_of_simple_shapes():
    assert major_axis_length(Point(0, 0).buffer(50, quad_segs=64)) == pytest.approx(100, rel=1e-3)
    assert major_axis_length(box(0, 0, 120, 10)) == pytest.approx(4 * 120 / np.sqrt(12))
    ring = box(0, 0, 100, 100).difference(box(25, 25, 75, 75))
    # Holes count: the variance of a square ring is (100^4 - 50^4) / 12 / (100^2 - 50^2) per axis.
    assert major_axis_length(ring) == pytest.approx(4 * np.sqrt((100**4 - 50**4) / 12 / (100**2 - 50**2)))


def test_lesion_regions_dilate_fill_and_flag_itc():
    tumor = MultiPolygon([box(0, 0, 1000, 1000), box(1060, 0, 1500, 1000), box(5000, 5000, 5020, 5020)])
    lesions, itc = lesion_regions(tumor, slide_mpp=1.0)
    # 60 px apart with 37.5 px of growth each: the first two merge; the 20 px speck is an ITC.
    assert len(lesions) == 2 and itc == [False, True]
    ringed = box(0, 0, 1000, 1000).difference(box(300, 300, 700, 700))
    (filled,), _ = lesion_regions(ringed, slide_mpp=1.0)
    assert not filled.interiors  # holes filled, as the challenge's script does


@pytest.mark.parametrize("parts", [1, 2])
def test_lesion_regions_grow_by_75_um_in_the_slides_pixels(parts):
    # At 0.25 um/px the challenge's 75 um (37.5 um a side) is 150 level-0 px, whether one lesion or several.
    tumor = box(0, 0, 400, 400) if parts == 1 else MultiPolygon([box(0, 0, 400, 400), box(10000, 0, 10400, 400)])
    lesions, _ = lesion_regions(tumor, slide_mpp=0.25)
    assert len(lesions) == parts
    assert lesions[0].bounds == pytest.approx((-150, -150, 550, 550), abs=0.5)
    # ITC: the grown region's major axis under 275 um (a square of side a: 4 sqrt(a^2 / 12) = 1.155 a):
    # 100 px grows to 400 px, 115 um; 1,000 px to 1,300 px, 375 um.
    _, itc = lesion_regions(MultiPolygon([box(0, 0, 100, 100), box(5000, 0, 6000, 1000)]), slide_mpp=0.25)
    assert itc == [True, False]


def test_a_lesion_cut_by_the_slide_edge_is_dilated_up_to_the_edge_only():
    """The challenge's script dilates a mask of the slide, which stops at its edge; the buffer ran past it, so a
    350 um lesion in a corner measured 296 um (not an ITC) where the script measures about 247 (an ITC)."""
    corner = Point(0, 0).buffer(350 / 2 / 0.243).intersection(box(0, 0, 40000, 40000))
    (free,), (free_itc,) = lesion_regions(corner, slide_mpp=0.243)
    (cut,), (cut_itc,) = lesion_regions(corner, slide_mpp=0.243, slide_size=(40000, 40000))
    assert free.bounds[0] < 0 and cut.bounds[:2] == pytest.approx((0, 0))
    assert not free_itc and cut_itc
    mid = box(20000, 20000, 20400, 20400)  # away from the edge nothing changes
    assert lesion_regions(mid, 0.243)[0][0].equals(lesion_regions(mid, 0.243, slide_size=(40000, 40000))[0][0])


def _camelyon_case():
    """Three slides, hand-counted. Slide A (tumour, mpp 1): lesions L1 1000 px square, L2 400 px square, an ITC
    (20 px) and an excluded square. Slide B normal, slide C normal with no detections."""
    ann_a = AnnotationSet.from_items(
        [
            ("_0", box(0, 0, 1000, 1000)),
            ("_0", box(5000, 5000, 5400, 5400)),
            ("_1", box(9000, 0, 9020, 20)),
            ("_2", box(20000, 20000, 21000, 21000)),
        ]
    )
    det_a = np.array(
        [
            [500, 500, 0.9],  # L1: its best hit
            [100, 100, 0.4],  # L1 again: ignored
            [1020, 500, 0.7],  # 20 px outside L1, inside its dilation: L1, ignored (lower)
            [5200, 5200, 0.55],  # L2
            [9010, 10, 0.8],  # ITC: ignored
            [20500, 20500, 0.99],  # excluded: ignored
            [15000, 15000, 0.6],  # false positive
        ]
    )
    det_b = np.array([[100, 100, 0.95], [200, 200, 0.5], [300, 300, 0.3]])
    return {"A": det_a, "B": det_b, "C": np.empty((0, 3))}, {"A": ann_a}


def test_froc_score_has_a_slide_bootstrap_interval():
    """metrics.json gave the FROC score bare, with no interval, and not the constants of its rule."""
    from wsi_vssm.outputs.froc import froc_score, froc_score_ci

    dets, anns = _camelyon_case()
    res = froc(dets, anns, slide_mpp=1.0, n_boot=300)
    low, high = res.score_ci95
    assert low <= res.score <= high and res.score_ci95 == froc(dets, anns, slide_mpp=1.0, n_boot=300).score_ci95
    d = res.as_dict()
    assert d["froc_ci95"] == [low, high] and (d["dilation_um"], d["itc_um"]) == (37.5, 275.0)
    assert froc(dets, anns, slide_mpp=1.0).score_ci95 is None  # only when asked
    # every resample of identical slides is the cohort itself: no width; slides without lesions vary the FPs only
    fps, tps = [np.array([0.7, 0.2])] * 3, [np.array([0.9, np.nan])] * 3
    assert froc_score_ci(fps, tps, n_boot=50) == [froc_score(fps, tps)] * 2
    lo, hi = froc_score_ci([*fps, np.array([0.95]), np.array([])], [*tps, np.array([]), np.array([])], n_boot=400)
    assert lo < hi and froc_score_ci([np.array([0.5])], [np.array([])]) is None  # no lesion: none


def test_froc_hand_computed():
    dets, anns = _camelyon_case()
    res = froc(dets, anns, slide_mpp=1.0)
    # FPs: 0.95, 0.6, 0.5, 0.3 over 3 slides; lesion hits 0.9 and 0.55 of 2. Lowering the threshold:
    # 0.95 -> (1/3, 0); 0.9 -> (1/3, 1/2); 0.6 -> (2/3, 1/2); 0.55 -> (2/3, 1); 0.5 -> (1, 1); 0.3 -> (4/3, 1).
    # At 1/4 FP/slide: between (0, 0) and (1/3, 0) -> 0; at 1/2: between (1/3, 1/2) and (2/3, 1/2) -> 1/2;
    # at 1, 2, 4, 8: 1. FROC = (0 + 0.5 + 4) / 6.
    assert res.sensitivity == {0.25: 0.0, 0.5: 0.5, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0, 8.0: 1.0}
    assert res.score == pytest.approx(4.5 / 6)
    assert (res.n_slides, res.n_lesions, res.n_itc, res.n_detections) == (3, 2, 1, 10)
    assert res.per_slide["A"] == {"lesions": 2, "itc": 1, "detected": 2, "false_positives": 1}
    d = res.as_dict()
    assert list(d["sensitivity_at_fps"]) == ["0.25", "0.5", "1", "2", "4", "8"]
    json.dumps(d)


def test_froc_interpolates_between_operating_points():
    dets, anns = _camelyon_case()
    dets["B"] = np.array([[100, 100, 0.5]])  # now: (0, 1/2) at 0.9 ... (1/3, 1) at 0.55 ... (2/3, 1)
    dets["A"] = dets["A"][dets["A"][:, 2] != 0.6]
    res = froc(dets, anns, slide_mpp=1.0)
    # Curve: (0, 0), (0, 1/2) [t=0.9], (0, 1) [t=0.55], (1/3, 1) [t=0.5]: every rate reaches 1.
    assert res.score == 1.0
    dets["A"][3, 2] = 0.45  # L2's hit now comes after B's FP: (0, 1/2), (1/3, 1/2), (1/3, 1)
    res = froc(dets, anns, slide_mpp=1.0)
    assert res.sensitivity[0.25] == 0.5 and res.sensitivity[0.5] == 1.0


def test_froc_without_lesions_and_bad_input():
    res = froc({"B": np.array([[1, 1, 0.5]])}, {}, slide_mpp=0.25)
    assert res.score is None and "no lesions" in res.reason
    assert set(res.sensitivity) == set(FP_RATES)
    res = froc({}, {}, slide_mpp=0.25)  # every slide failed or had no tissue: a null score, not an error
    assert res.score is None and res.reason == "no slide was scored" and res.n_slides == 0
    assert res.as_dict()["sensitivity_at_fps"] == {f"{r:g}": None for r in FP_RATES}
    with pytest.raises(UsageError, match="without detections"):
        froc({"B": np.empty((0, 3))}, {"A": None}, slide_mpp=1.0)
    with pytest.raises(UsageError, match="n, 3"):
        froc({"B": np.ones((2, 2))}, {}, slide_mpp=1.0)
    with pytest.raises(UsageError, match="mpp"):
        froc({"B": np.empty((0, 3))}, {}, slide_mpp={"C": 1.0})


def test_froc_png_draws_the_curve_or_says_why_not(tmp_path):
    """evaluate --annotations gave the FROC in metrics.json only: no curve to look at or publish."""
    from wsi_vssm.outputs.froc import froc_png

    def curve_pixels(path):  # the curve's colour (matplotlib's C3)
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) > 100
            rgb = np.asarray(im.convert("RGB")).astype(int)
        return int((np.abs(rgb - (214, 39, 40)).sum(-1) < 30).sum())

    dets, anns = _camelyon_case()
    froc_png(tmp_path / "froc.png", froc(dets, anns, slide_mpp=1.0))
    froc_png(tmp_path / "none.png", froc({"B": np.array([[1, 1, 0.5]])}, {}, slide_mpp=0.25))
    assert curve_pixels(tmp_path / "froc.png") > 200 and curve_pixels(tmp_path / "none.png") == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_detections_from_heatmap():
    prob = np.full((20, 30), np.nan, np.float32)
    prob[2:18, 2:28] = 0.05
    prob[5, 6] = 0.9  # a peak
    prob[5, 7] = 0.7  # its shoulder: no detection
    prob[12:15, 20:23] = 1.0  # a saturated plateau: one detection, at its centre
    prob[15, 3] = 0.3  # below threshold
    det = detections_from_heatmap(prob, cell0=10.0, origin=(100, 200), threshold=0.5)
    np.testing.assert_allclose(det, [[100 + 21.5 * 10, 200 + 13.5 * 10, 1.0], [100 + 6.5 * 10, 200 + 5.5 * 10, 0.9]])
    assert detections_from_heatmap(np.full((3, 3), np.nan, np.float32), 1.0, (0, 0)).shape == (0, 3)


def test_a_shelf_beside_a_higher_cell_is_no_detection():
    """A run of equal values whose far end lies out of the window of a higher cell was a second detection there
    (an extra false positive when the cells lie outside every lesion)."""
    prob = np.zeros((5, 9), np.float32)
    prob[2, 1:6] = 0.8  # a shelf 5 cells long
    prob[2, 6] = 0.95  # the top beside it
    prob[0, 8] = 0.8  # a separate maximum of the shelf's value: still one
    det = detections_from_heatmap(prob, cell0=1.0, origin=(0, 0), threshold=0.5)
    np.testing.assert_allclose(det, [[6.5, 2.5, 0.95], [8.5, 0.5, 0.8]])
    # the window counts from every member: a top two cells from the shelf's end hides it at min_distance 2 only
    prob = np.zeros((3, 7), np.float32)
    prob[1, 1:3], prob[1, 4] = 0.8, 0.95
    assert len(detections_from_heatmap(prob, 1.0, (0, 0), threshold=0.5, min_distance=1)) == 2
    assert len(detections_from_heatmap(prob, 1.0, (0, 0), threshold=0.5, min_distance=2)) == 1


def test_the_intervals_do_not_depend_on_the_order_of_the_rows():
    """The same 10 slides listed in reverse gave auc_ci95 [0.36, 1.0] against [0.40, 1.0] (and another ECE
    interval): the seeded resamples picked rows by position."""
    from wsi_vssm.outputs.calibration import bootstrap_ece_ci, ece_if_calibrated
    from wsi_vssm.outputs.staging import bootstrap_kappa_ci

    rng = np.random.default_rng(5)
    y = np.array([0, 1] * 10)
    s = rng.random(20) * 0.6 + 0.3 * y
    order = rng.permutation(20)
    assert bootstrap_auc_ci(y, s, n_boot=200) == bootstrap_auc_ci(y[order], s[order], n_boot=200)
    assert bootstrap_ece_ci(y, s, n_boot=200) == bootstrap_ece_ci(y[order], s[order], n_boot=200)
    assert ece_if_calibrated(s, n_sim=200) == ece_if_calibrated(s[order], n_sim=200)
    ref = ["pN0", "pN1", "pN2", "pN0(i+)", "pN1mi", "pN0", "pN1", "pN2"]
    pred = ["pN0", "pN1mi", "pN2", "pN0", "pN1", "pN1", "pN1", "pN2"]
    back = list(range(len(ref)))[::-1]
    assert bootstrap_kappa_ci(ref, pred, n_boot=200) == bootstrap_kappa_ci([ref[i] for i in back],
                                                                          [pred[i] for i in back], n_boot=200)


def test_slides_whose_probabilities_round_to_one_are_ranked_by_their_logits(tmp_path):
    """float32's sigmoid is 1.0 above a logit of 16.6 and the default model calls slides at 50 and more: two
    tumour slides and a normal one at 1.0 tied, and the AUC counted the tie as a half."""
    from wsi_vssm.outputs.calibration import logistic, logit
    from wsi_vssm.runs.evaluate import _write_metrics

    z = [57.4, 40.0, 20.0, -1.4]
    rows = [{"slide": f"s{i}", "label": y, "probability": float(np.float32(logistic(v) if v < 0 else 1.0)),
             "status": "done", "logit": v} for i, (y, v) in enumerate(zip([1, 1, 0, 0], z, strict=True))]
    m = _write_metrics(tmp_path, rows, 0.5, 0, 200)
    assert m["auc"] == 1.0 and m["auc_ranked_by"] == "logit" and m["sensitivity"] == 1.0
    m = _write_metrics(tmp_path, [{**rows[0], "logit": None}, *rows[1:]], 0.5, 0, 200)  # one without: none used
    assert m["auc"] == 0.75 and m["auc_ranked_by"] == "probability"
    assert cohort_metrics([1, 0], [1.0, 1.0], 0.5, n_boot=10, ranks=[50.0, 20.0])["auc"] == 1.0
    assert logistic(16.0) < logistic(30.0) < logistic(31.0) < 1.0  # float64 keeps them apart up to about 36.7 ...
    assert logit(logistic(30.0)) == pytest.approx(30.0, abs=1e-3)
    assert np.isfinite(logit(np.array([0.0, 1.0]))).all()  # ... and logit() of a rounded 0 or 1 stays finite


def test_froc_detection_files_never_replace_a_slides_outputs(tmp_path):
    """A slide named froc_detections from before the name was reserved has its outputs there: kept, warned of."""
    from wsi_vssm.runs.cohort_froc import write_detections

    folder = tmp_path / "froc_detections"
    write_detections(folder, {"a": np.array([[10.4, 20.6, 0.5]]), "b": np.empty((0, 3))})
    assert (folder / "a.csv").read_text() == "0.5,10,21\n" and (folder / "b.csv").read_text() == ""
    write_detections(folder, {"c": np.array([[1.0, 2.0, 0.25]])})  # replaced whole: a and b gone
    assert sorted(p.name for p in folder.iterdir()) == ["c.csv"]
    (folder / "prediction.json").write_text("{}")
    with pytest.warns(UserWarning, match="a slide's output folder, not replaced"):
        write_detections(folder, {"d": np.array([[1.0, 2.0, 0.25]])})
    assert (folder / "prediction.json").exists() and not (folder / "d.csv").exists()


def test_resampled_aucs_equal_rank_sums_to_the_last_bit():
    """The bootstraps count instead of ranking each resample (about 9x faster at 100,000 items): the values, and
    so every interval printed before, must stay exactly the same."""
    from wsi_vssm.outputs.report import rankdata, resampled_aucs

    rng = np.random.default_rng(7)
    for m, n, decimals in ((3, 2, 0), (40, 55, 1), (300, 200, 2), (1000, 1500, 8)):
        pos, neg = np.round(rng.normal(1, 1, m), decimals), np.round(rng.normal(0, 1, n), decimals)  # ties
        p_idx, n_idx = rng.integers(0, m, (25, m)), rng.integers(0, n, (25, n))
        ranks = rankdata(np.concatenate([pos[p_idx], neg[n_idx]], axis=1), axis=1)
        want = (ranks[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
        assert np.array_equal(resampled_aucs(pos, neg, p_idx, n_idx), want)
