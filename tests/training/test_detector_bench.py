"""bench/detector.py's interval of the 16 -> 48 drop: both cohorts resampled within their classes."""

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
