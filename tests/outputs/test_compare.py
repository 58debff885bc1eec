"""`wsi-vssm compare`: the paired DeLong test against its textbook form, its calibration under the null, the
paired bootstrap, and the command on two evaluate folders."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli_captured

from wsi_vssm.outputs.compare import paired_bootstrap_difference, paired_delong
from wsi_vssm.outputs.report import delong_auc_ci, roc_auc, write_predictions_csv


def _textbook(y, a, b):
    """DeLong et al. (1988) as written: the placement matrix psi(X, Y) over every positive-negative pair, the
    covariance matrices S10 and S01 of the two scores' placements, var(A - B) = c' (S10 / m + S01 / n) c."""
    y = np.asarray(y)
    v10, v01 = [], []
    for s in (np.asarray(a, float), np.asarray(b, float)):
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    c = np.array([1.0, -1.0])
    var = c @ (s10 / len(v10[0]) + s01 / len(v01[0])) @ c
    return v10[0].mean() - v10[1].mean(), var


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_delong_matches_the_textbook_form(seed):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(23), np.zeros(31)].astype(int)
    a = y * 1.0 + rng.normal(size=y.size)
    b = 0.6 * a + y * 0.3 + rng.normal(size=y.size)
    b[:5] = np.round(b[:5], 0)  # ties inside and across classes
    res = paired_delong(y, a, b)
    diff, var = _textbook(y, a, b)
    assert res["auc_a"] == pytest.approx(roc_auc(y, a)) and res["auc_b"] == pytest.approx(roc_auc(y, b))
    assert res["difference"] == pytest.approx(diff) and res["se"] == pytest.approx(np.sqrt(var))
    assert res["ci95"][0] < res["difference"] < res["ci95"][1]
    assert res["p"] == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(abs(res["z"]) / np.sqrt(2)))), rel=1e-9)
    # swapping the models flips the sign and keeps the test
    swapped = paired_delong(y, b, a)
    assert swapped["difference"] == pytest.approx(-res["difference"]) and swapped["p"] == pytest.approx(res["p"])


def test_paired_delong_against_an_independent_score_reduces_to_single_delong():
    """With B uncorrelated noise on its own, var(A - B) is var(A) + var(B) - 2 cov; B constant leaves var(A) alone:
    then the difference's SE is the single-curve DeLong SE of A."""
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(30), np.zeros(30)].astype(int)
    a = y + rng.normal(size=60)
    res = paired_delong(y, a, np.zeros(60))  # B ranks nothing: AUC 0.5, placements all 0.5, no variance
    assert res["auc_b"] == 0.5
    auc = roc_auc(y, a)
    low, high = delong_auc_ci(y, a)  # on the logit scale: undo it to get the SE
    se_logit = (np.log(high / (1 - high)) - np.log(low / (1 - low))) / (2 * 1.959963984540054)
    assert res["se"] == pytest.approx(se_logit * auc * (1 - auc), rel=1e-6)


def test_paired_delong_holds_its_level_under_the_null():
    """Two noisy readings of one score: equal AUCs. About 5% of cohorts should reject at 0.05."""
    rng = np.random.default_rng(11)
    rejections = 0
    trials = 400
    for _ in range(trials):
        y = np.r_[np.ones(40), np.zeros(40)].astype(int)
        latent = y * 1.2 + rng.normal(size=80)
        res = paired_delong(y, latent + 0.7 * rng.normal(size=80), latent + 0.7 * rng.normal(size=80))
        rejections += res["p"] < 0.05
    assert 0.02 <= rejections / trials <= 0.09, rejections


def test_paired_delong_detects_a_real_difference_and_says_when_undefined():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(60), np.zeros(60)].astype(int)
    latent = y * 1.5 + rng.normal(size=120)
    res = paired_delong(y, latent + 0.2 * rng.normal(size=120), latent + 2.0 * rng.normal(size=120))
    assert res["difference"] > 0 and res["p"] < 0.01
    same = paired_delong(y, latent, 3 * latent + 1)  # one ranking: no variance to measure
    assert same["difference"] == 0 and same["p"] is None and same["ci95"] is None
    with pytest.raises(Exception, match="both classes"):
        paired_delong([1, 1], [0.1, 0.2], [0.3, 0.4])


def test_paired_bootstrap_is_seeded_order_free_and_covers_the_difference():
    rng = np.random.default_rng(4)
    y = np.r_[np.ones(25), np.zeros(25)].astype(int)
    a = y + rng.normal(size=50)
    b = 0.5 * y + rng.normal(size=50)
    ci = paired_bootstrap_difference(y, a, b, n_boot=500)
    perm = rng.permutation(50)
    assert paired_bootstrap_difference(y[perm], a[perm], b[perm], n_boot=500) == ci
    diff = roc_auc(y, a) - roc_auc(y, b)
    assert ci[0] < diff < ci[1]
    delong = paired_delong(y, a, b)["ci95"]  # two routes to one interval: close on 50 slides
    assert abs(ci[0] - delong[0]) < 0.06 and abs(ci[1] - delong[1]) < 0.06


def _run(folder, rows, model="m", weights="aaaa", **params):
    folder.mkdir()
    write_predictions_csv(folder / "predictions.csv", rows)
    (folder / "metrics.json").write_text(json.dumps({
        "complete": True, "cohort": "/data/cohort.csv", "model": {"name": model, "weights_hash": weights},
        "parameters": {"tta": False, "params_hash": "x", **params}}))
    return folder


def _rows(y, scores, logits=True):
    return [{"slide": f"s{i:02d}", "label": int(t), "probability": float(1 / (1 + np.exp(-z))), "status": "done",
             "logit": float(z) if logits else None} for i, (t, z) in enumerate(zip(y, scores, strict=True))]


def test_compare_command_on_two_evaluate_folders(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(12), np.zeros(12)].astype(int)
    a, b = 2 * y + rng.normal(size=24), y + rng.normal(size=24)
    rows_b = _rows(y, b) + [{"slide": "extra", "label": 1, "probability": 0.9, "status": "done"}]
    out_a = _run(tmp_path / "a", _rows(y, a))
    out_b = _run(tmp_path / "b", rows_b, weights="bbbb", tta=True)
    code, out, err = run_cli_captured(["compare", out_a, out_b, "--json", tmp_path / "c.json",
                                       "--bootstrap", "300"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["n"] == 24 and res["runs"][1]["left_out"] == ["extra"]
    assert res["differences"] == {"weights": ["aaaa", "bbbb"], "tta": [False, True]}
    want = paired_delong(y, a, b)
    assert res["difference"] == pytest.approx(want["difference"]) and res["p"] == pytest.approx(want["p"])
    assert "extra" in err and err.count("\n") == 1  # the slide scored by one run only, named in one warning
    assert "compared on 24 slides scored by both (12 tumour, 12 normal)" in out
    assert f"A - B: {want['difference']:+.3f}" in out and "paired DeLong" in out


def test_compare_refuses_runs_that_cannot_be_compared(tmp_path, capsys):
    y = np.r_[np.ones(3), np.zeros(3)].astype(int)
    out_a = _run(tmp_path / "a", _rows(y, np.arange(6.0)))
    flipped = _rows(y, np.arange(6.0))
    flipped[0]["label"] = 0
    out_b = _run(tmp_path / "b", flipped)
    assert_one_line_error(["compare", out_a, out_b], capsys, 1, "s00", "not of one cohort")
    few = _run(tmp_path / "few", _rows(y, np.arange(6.0))[2:5])  # 1 tumour, 2 normal
    assert_one_line_error(["compare", out_a, few], capsys, 1, "1 tumour and 2 normal", "at least 2 of each")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(["compare", out_a, tmp_path / "empty"], capsys, 1, "no predictions.csv")


def test_compare_says_when_a_run_has_no_metrics(tmp_path, capsys):
    """A folder without metrics.json was said to differ in "model m -> None; tta False -> None"."""
    y = np.r_[np.ones(3), np.zeros(3)].astype(int)
    out_a = _run(tmp_path / "a", _rows(y, np.arange(6.0)))
    out_b = _run(tmp_path / "b", _rows(y, np.arange(6.0)[::-1]))
    (out_b / "metrics.json").unlink()
    code, out, err = run_cli_captured(["compare", out_a, out_b], capsys)
    assert code == 0 and "no readable metrics.json" in err and "differ in" not in out
