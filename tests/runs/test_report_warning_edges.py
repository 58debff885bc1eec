"""The edges of `runs.report_warnings`: which rows each warning counts and where its thresholds fall, from
hand-built rows (no run, no model)."""

from __future__ import annotations

import json

from wsi_vssm.runs.evaluate import EvaluationResult
from wsi_vssm.runs.report_warnings import (
    SHARED_PATCHES,
    SMALL_CLASS,
    SMALL_CLASS_AUC,
    domain_warning,
    few_patients_warning,
    separation_warning,
    shared_patches_warning,
    small_cohort_warning,
    unranked_logits_warning,
)


def _rows(n_tumour: int, n_normal: int, status: str = "done", start: int = 0) -> list[dict]:
    """Rows of `n_tumour` tumour then `n_normal` normal slides; a probability only when `status` is done."""
    labels = [1] * n_tumour + [0] * n_normal
    return [{"slide": f"s{start + i}", "label": y, "probability": (0.9 if y else 0.1) if status == "done" else None,
             "status": status, "error": None if status == "done" else "broken"} for i, y in enumerate(labels)]


def test_one_small_class_beside_a_large_one_still_makes_the_interval_unreliable():
    """30 tumour and 5 normal slides: the interval was called reliable because the larger class had 20."""
    warning = small_cohort_warning(EvaluationResult({"auc": 0.9}, _rows(30, 5)))
    assert warning is not None and "rests on 30 tumour and 5 normal slides" in warning, warning


def test_failed_slides_do_not_count_towards_a_class():
    """15 done and 10 failed slides a class: the failed ones were counted, 25 a class, and no warning came."""
    rows = _rows(15, 15) + _rows(10, 10, status="failed", start=30)
    warning = small_cohort_warning(EvaluationResult({"auc": 0.9}, rows))
    assert warning is not None and "rests on 15 tumour and 15 normal slides" in warning, warning
    assert small_cohort_warning(EvaluationResult({"auc": 0.9}, _rows(SMALL_CLASS_AUC, SMALL_CLASS_AUC))) is None


def test_an_interval_that_starts_at_chance_covers_it():
    """A 95% CI of exactly 0.500-0.900 covers 0.5: a strict comparison said the scores separate."""
    rows = _rows(2, 2)
    rows[0]["probability"] = 0.3
    warning = separation_warning(EvaluationResult({"auc": 0.7, "auc_ci95": [0.5, 0.9]}, rows))
    assert warning is not None and "0.500-0.900 covers 0.5" in warning, warning
    assert separation_warning(EvaluationResult({"auc": 0.7, "auc_ci95": [0.1, 0.5]}, rows)) is not None


def test_a_slide_without_a_probability_is_not_named_out_of_domain():
    """A no-tissue slide (no probability, in_domain False) was named among the scored slides out of domain."""
    rows = [{"slide": "scored_out", "label": 1, "probability": 0.8, "status": "done", "in_domain": False},
            {"slide": "blank", "label": 0, "probability": None, "status": "no_tissue", "in_domain": False},
            {"slide": "fine", "label": 0, "probability": 0.2, "status": "done", "in_domain": True}]
    warning = domain_warning(EvaluationResult({"n_out_of_domain": 1, "n": 2, "auc": 1.0}, rows))
    assert warning is not None and "(scored_out;" in warning, warning
    assert "blank" not in warning, warning


def _mosaic(tmp_path, held: dict[str, list[str]]) -> str:
    """A mosaic.json of normal slides, each holding the named patches (one row of them)."""
    path = tmp_path / "mosaic.json"
    path.write_text(json.dumps({"slides": [{"name": n, "label": "normal", "patches": [p]} for n, p in held.items()]}))
    return str(path)


def test_slides_that_were_not_scored_do_not_make_a_shared_patches_warning(tmp_path):
    """Two normal slides sharing every patch, one of them failed: the warning counted the unscored one."""
    path = _mosaic(tmp_path, {"a": ["p1", "p2"], "b": ["p1", "p2"]})
    rows = [{"slide": "a", "label": 0, "probability": 0.1, "status": "done"},
            {"slide": "b", "label": 0, "probability": None, "status": "failed"}]
    assert shared_patches_warning(EvaluationResult({"mosaics": path}, rows)) is None
    rows[1].update(probability=0.2, status="done")  # both scored: the shared patches are said
    assert shared_patches_warning(EvaluationResult({"mosaics": path}, rows)) is not None


def test_exactly_the_shared_share_is_warned_about(tmp_path):
    """A typical patch in exactly 20% of the other normal slides is warned about (`share >= SHARED_PATCHES`)."""
    names = [f"n{i}" for i in range(6)]  # each patch in 2 of 6 slides: in 1 of the other 5, 20%
    path = _mosaic(tmp_path, {n: [f"p{i}", f"p{(i + 1) % 6}"] for i, n in enumerate(names)})
    rows = [{"slide": n, "label": 0, "probability": 0.1, "status": "done"} for n in names]
    assert SHARED_PATCHES == 0.2
    warning = shared_patches_warning(EvaluationResult({"mosaics": path}, rows))
    assert warning is not None and "sits in 20% of the other normal slides" in warning, warning


def test_exactly_small_class_patients_make_no_few_patients_warning():
    """SMALL_CLASS patients are enough; one fewer is warned about."""
    assert few_patients_warning(EvaluationResult({"kappa": 0.8, "n_patients": SMALL_CLASS})) is None
    warning = few_patients_warning(EvaluationResult({"kappa": 0.8, "n_patients": SMALL_CLASS - 1}))
    assert warning is not None and f"rests on {SMALL_CLASS - 1} patient(s)" in warning, warning


def test_a_cohort_ranked_by_probabilities_for_want_of_old_logits_names_those_slides():
    """A cohort resumed over slides predicted before logits were recorded fell back to ranking probabilities
    (metrics.json auc_ranked_by) without a word: probabilities of 1.000 tie, however far apart their logits."""
    rows = _rows(3, 2)
    for r, z in zip(rows, (40.0, None, None, -3.0, None), strict=True):
        r["logit"] = z
    rows[0]["probability"] = rows[1]["probability"] = 1.0
    warning = unranked_logits_warning(EvaluationResult({"auc_ranked_by": "probability"}, rows))
    assert warning is not None and warning.startswith("3 of 5 scored slides were predicted before logits were "
                                                      "recorded (s1, s2, s4): "), warning
    assert "tie at 1.000 (2 do here)" in warning and "delete those slides' folders" in warning, warning
    assert unranked_logits_warning(EvaluationResult({"auc_ranked_by": "logit"}, rows)) is None
    rows = _rows(2, 2)  # patches or slides ranked by probability for another reason: none lack a logit
    for r in rows:
        r["logit"] = 0.0
    assert unranked_logits_warning(EvaluationResult({"auc_ranked_by": "probability"}, rows)) is None
