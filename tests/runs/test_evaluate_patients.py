"""`evaluate --patients`: node categories, pN stages, kappa, stages.csv and the confusion matrix."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from wsi_vssm.cli import main

FAST = ["--device", "cpu", "--reader-threads", "1", "--bootstrap", "200"]


@pytest.fixture(scope="module")
def patient_cohort(tmp_path_factory):
    """One synthetic patient (pN0: five negative nodes) of small slides, as `synth --patients` writes it."""
    out = tmp_path_factory.mktemp("patients")
    with pytest.raises(SystemExit) as e:
        main(["synth", str(out), "--patients", "1", "--size", "1024", "--mpp", "1.0", "--workers", "1"])
    assert e.value.code == 0
    return out


def _cli(args) -> int:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


def test_evaluate_with_patients_writes_stages_kappa_and_confusion(patient_cohort, model_file, tmp_path, capsys):
    out = tmp_path / "ev"
    code = _cli(["evaluate", patient_cohort, "--patients", patient_cohort / "patients.csv", "--model", model_file,
                 "--out", out, *FAST])
    assert code == 0
    rows = list(csv.DictReader((out / "stages.csv").read_text().splitlines()))
    assert [r["patient"] for r in rows] == ["patient_000"] and rows[0]["reference_stage"] == "pN0"
    assert rows[0]["stage"] in ("pN0", "pN0(i+)", "pN1mi", "pN1", "pN2")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_patients"] == 1 and len(metrics["kappa_ci95"]) == 2
    assert -1.0 <= metrics["kappa"] <= 1.0
    confusion = metrics["node_confusion"]
    assert confusion["labels"] == ["negative", "itc", "micro", "macro"]
    assert sum(map(sum, confusion["matrix"])) == 5 and sum(confusion["matrix"][0]) == 5  # all reference-negative
    assert (out / "confusion.png").stat().st_size > 1000
    assert "kappa" in capsys.readouterr().out


def test_patients_table_naming_unknown_slides_is_one_line(patient_cohort, model_file, tmp_path, capsys):
    bad = tmp_path / "patients.csv"
    names = [f"ghost_{i}" for i in range(7)]
    bad.write_text("patient,slide\n" + "".join(f"p1,{n}\n" for n in names))
    code = _cli(["evaluate", patient_cohort, "--patients", bad, "--model", model_file, "--out", tmp_path / "ev",
                 *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "ghost_0" in err[0] and "ghost_4" in err[0] and "ghost_6" not in err[0]
    assert not (tmp_path / "ev" / "patient_000_node_0").exists(), "no slide runs before the table is checked"


def test_a_failed_node_leaves_only_its_patient_unstaged(patient_cohort, model_file, tmp_path, capsys):
    cohort = tmp_path / "c"
    shutil.copytree(patient_cohort, cohort)
    node = cohort / "patient_000_node_2.tif"
    node.write_bytes(node.read_bytes()[:3000])  # truncated: that slide fails
    (cohort / "p.csv").write_text("patient,slide\n" + "".join(
        f"{'a' if i < 2 else 'b'},patient_000_node_{i}\n" for i in range(5)))
    out = tmp_path / "ev"
    code = _cli(["evaluate", cohort, "--patients", cohort / "p.csv", "--model", model_file, "--out", out, *FAST])
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" not in err  # some slides failed; the report is there
    assert "1 patient(s) not staged" in err and ": b" in err
    assert [r["patient"] for r in csv.DictReader((out / "stages.csv").read_text().splitlines())] == ["a"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_patients"] == 1 and metrics["patients_not_staged"] == ["b"] and metrics["kappa"] is not None
