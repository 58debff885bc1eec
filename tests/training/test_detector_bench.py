"""bench/detector.py: the interval of the 16 -> 48 drop (both cohorts resampled within their classes) and the
by-size rows of its table."""

from __future__ import annotations

import numpy as np
from conftest import load_bench


def test_drop_interval_covers_zero_for_one_cohort_and_not_for_a_clear_gap():
    drop_ci = load_bench("detector").drop_ci
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(30), np.zeros(30)]
    noisy = [[int(a), float(b)] for a, b in zip(y, y * 0.5 + rng.random(60), strict=True)]  # AUC about 0.75
    low, high = drop_ci(noisy, noisy, n_boot=300)
    assert low < 0 < high and drop_ci(noisy, noisy, n_boot=300) == [low, high]  # seeded
    clean = [[int(a), float(a)] for a in y]  # AUC 1 in every resample
    chance = [[int(a), float(b)] for a, b in zip(y, rng.random(60), strict=True)]  # AUC about 0.5
    low, high = drop_ci(clean, chance, n_boot=300)
    assert 0.2 < low < high < 0.8


def test_table_reports_every_size_and_marks_cohorts_not_scored(capsys):
    bench = load_bench("detector")
    scored = {"sensitivity": 0.5, "specificity": 0.75, "normal_median_probability": 0.2}
    results = {"a": {**{c: dict(scored) for c in bench.SIZE_COHORTS}}, "b": {"select16": dict(scored)}}
    bench.print_table(results)
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in capsys.readouterr().out.splitlines()}
    by_size = lines["sensitivity / specificity at slide_threshold, 16 / 32 / 48 sel., 64 held-back"]
    assert by_size == ["0.50/0.75 ; 0.50/0.75 ; 0.50/0.75 ; 0.50/0.75", "0.50/0.75 ; -/- ; -/- ; -/-"]
    medians = lines["normal slides' median probability, 16 / 32 / 48 sel., 64 held-back"]
    assert medians == ["0.20 / 0.20 / 0.20 / 0.20", "0.20 / - / - / -"]
    assert lines["patch AUC, held-back valid"] == ["-", "-"]  # figures a model lacks print as '-'
