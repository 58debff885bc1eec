"""Mosaic patients (wsi_vssm.synth.mosaic_patients): CAMELYON17-style nodes tiled from labelled patches."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from wsi_vssm.synth.mosaic_patients import GRID, LESION_PATCHES, MACRO_GRID, make_mosaic_patient_cohort, plan_node


@pytest.mark.parametrize("category", ["negative", "itc", "micro", "macro"])
def test_node_lesion_is_a_compact_disc_of_its_category(category):
    labels = np.array([0] * 40 + [1] * 30)  # a pool smaller than the slide: patches are reused
    for seed in range(4):
        index, diameter = plan_node(category, labels, np.random.default_rng(seed))
        tumour = (index >= 0) & (labels[np.maximum(index, 0)] == 1)
        assert index.shape[0] == (MACRO_GRID if category == "macro" else GRID)
        if category == "negative":
            assert diameter == 0 and not tumour.any()
            continue
        lo, hi = LESION_PATCHES[category]
        assert lo <= diameter <= hi
        rows, cols = np.nonzero(tumour)
        extent = max(np.ptp(rows), np.ptp(cols)) + 1  # cells whose centres fall in the disc: d or d + 1 across
        assert diameter - 1 <= extent <= diameter + 1
        assert (index >= 0).sum() > tumour.sum()  # normal tissue around it


def test_cohort_writes_patients_and_reference(tmp_path):
    from conftest import write_patch_folder

    from wsi_vssm.training.data.patches import load_patches

    write_patch_folder(tmp_path / "p", 12, seed=0)
    recs = make_mosaic_patient_cohort(tmp_path / "out", load_patches(tmp_path / "p"), 2, seed=1)
    assert len(recs) == 10 and all(r.path.is_file() for r in recs)
    with open(tmp_path / "out" / "reference.csv") as f:
        ref = list(csv.DictReader(f))
    assert {r["category"] for r in ref[:5]} == {"negative"}  # patient 0 is pN0
    assert any(r["category"] == "itc" for r in ref[5:])  # patient 1 is pN0(i+)
    assert (tmp_path / "out" / "patients.csv").read_text().startswith("patient,slide\n")


def test_synth_command_writes_mosaic_patients(tmp_path, capsys):
    from conftest import write_patch_folder

    from wsi_vssm.cli import main

    write_patch_folder(tmp_path / "p", 10, seed=0)
    with pytest.raises(SystemExit) as stop:
        main(["synth", str(tmp_path / "out"), "--patients", "1", "--from-patches", str(tmp_path / "p")])
    assert stop.value.code in (0, None)
    assert "1 mosaic patients (5 node slides)" in capsys.readouterr().out
    assert len(list((tmp_path / "out").glob("patient_000_node_*.tif"))) == 5
