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
    got = capsys.readouterr()
    assert "kappa" in got.out
    assert "the pN kappa rests on 1 patient(s)" in got.err  # one patient: 1.000 (1.000-1.000) or 0.000 (0.000-0.000)
    # a rerun without --patients took neither file away: they stood beside a metrics.json with no stage in it
    assert _cli(["evaluate", patient_cohort, "--model", model_file, "--out", out, *FAST]) == 0
    assert "kappa" not in json.loads((out / "metrics.json").read_text())
    assert not (out / "stages.csv").exists() and not (out / "confusion.png").exists()


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


def _manifest(cohort, path, categories: dict[str, str] | None = None, tumour: tuple[str, ...] = ()) -> None:
    """A manifest of the cohort's nodes (absolute paths), labelling `tumour` ones 1, with an optional
    category column."""
    names = sorted(p.stem for p in cohort.glob("patient_*.tif"))
    head = "slide,label" + (",category" if categories is not None else "")
    rows = [f"{cohort / n}.tif,{int(n in tumour)}" + (f",{categories.get(n, 'negative')}" if categories is not None
                                                      else "") for n in names]
    path.write_text("\n".join([head, *rows]) + "\n")


def test_a_tumour_node_without_a_reference_category_is_refused_before_any_slide(patient_cohort, model_file,
                                                                                tmp_path, capsys):
    """A manifest labelling a node tumour, with no category column and no annotation file for it, once staged
    that node as a negative reference: pN0 against pN0, kappa 1.0, exit 0."""
    manifest = tmp_path / "m.csv"
    _manifest(patient_cohort, manifest, tumour=("patient_000_node_1",))
    out = tmp_path / "ev"
    code = _cli(["evaluate", manifest, "--patients", patient_cohort / "patients.csv", "--model", model_file,
                 "--out", out, *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "needs the reference category of every tumour node" in err[0] and "patient_000_node_1" in err[0]
    assert not (out / "patient_000_node_0").exists(), "no slide runs before the reference is checked"


def test_a_manifest_category_column_is_the_reference(patient_cohort, model_file, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    _manifest(patient_cohort, manifest, categories={"patient_000_node_1": "itc"}, tumour=("patient_000_node_1",))
    out = tmp_path / "ev"
    code = _cli(["evaluate", manifest, "--patients", patient_cohort / "patients.csv", "--model", model_file,
                 "--out", out, *FAST])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader((out / "stages.csv").read_text().splitlines()))
    assert rows[0]["reference_stage"] == "pN0(i+)"  # one ITC node: the manifest's category was read
    matrix = json.loads((out / "metrics.json").read_text())["node_confusion"]["matrix"]
    assert sum(matrix[1]) == 1  # one reference-ITC node


def test_confusion_png_draws_the_stage_and_the_node_matrices(tmp_path):
    import numpy as np
    from PIL import Image

    from wsi_vssm.outputs.staging import NODE_CATEGORIES, STAGES, confusion_png, confusions_png

    stage, node = np.eye(len(STAGES), dtype=int), np.eye(len(NODE_CATEGORIES), dtype=int)
    confusion_png(tmp_path / "one.png", node, NODE_CATEGORIES)
    confusions_png(tmp_path / "two.png", [(stage, STAGES, "stages"), (node, NODE_CATEGORIES, "nodes")])
    one, two = Image.open(tmp_path / "one.png"), Image.open(tmp_path / "two.png")
    assert two.width >= 1.8 * one.width  # two panels side by side, each at least as large as the single one


def test_a_node_that_fails_on_a_rerun_is_not_staged_from_its_old_prediction(patient_cohort, model_file, tmp_path,
                                                                             capsys):
    """A node slide that ran once and then changed and failed still had the old run's prediction.json in its
    folder, and its patient was staged from it (kappa over every patient, no warning)."""
    cohort = tmp_path / "c"
    shutil.copytree(patient_cohort, cohort)
    (cohort / "p.csv").write_text("patient,slide\n" + "".join(
        f"{'a' if i < 2 else 'b'},patient_000_node_{i}\n" for i in range(5)))
    out = tmp_path / "ev"
    args = ["evaluate", cohort, "--patients", cohort / "p.csv", "--model", model_file, "--out", out, *FAST]
    assert _cli(args) == 0
    node = cohort / "patient_000_node_2.tif"
    node.write_bytes(node.read_bytes()[:3000])  # the file changes and now fails
    capsys.readouterr()
    assert _cli(args) == 3
    assert (out / "patient_000_node_2" / "prediction.json").is_file()  # the old run's, left in place
    assert "1 patient(s) not staged" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["patients_not_staged"] == ["b"] and metrics["n_patients"] == 1
    assert [r["patient"] for r in csv.DictReader((out / "stages.csv").read_text().splitlines())] == ["a"]
