"""bench/region_consistency.py: a slide read as one region at either size gives the same calls and cells."""

from __future__ import annotations

import sys

from conftest import load_bench


def test_two_sizes_that_both_hold_the_slide_agree_exactly(cohort, model_file, monkeypatch, capsys):
    bench = load_bench("region_consistency")
    # the 1,024 px slides at 2 um/px are about 2,100 px at the model's 0.97: one region at 4096 and at 8192
    monkeypatch.setattr(sys, "argv", ["region_consistency", "--cohort", str(cohort), "--regions", "4096", "8192",
                                      "--overlap", "64", "--slides", "1", "--model", str(model_file)])
    bench.main()
    out = capsys.readouterr().out
    assert "2 slides of" in out and "tumor_001 (1)" in out and "normal_001 (0)" in out, out
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("8192 "))
    assert row == ["8192", "0.000", "0.000", "0", "1.000", "1.000"], out
    auc = next(line for line in out.splitlines() if line.startswith("slide AUC: "))
    assert auc.count(" px ") == 2 and len({part.split()[-1] for part in auc.split(",")}) == 1, auc
