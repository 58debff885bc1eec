"""A slide out of the model's domain says so wherever its result is read: the per-slide line (also a rerun's
"up to date" line, where no warning repeats it), predictions.csv, metrics.json and evaluate's warnings."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import run_cli_captured, write_tiny_model

FAST = ["--device", "cpu", "--target-mpp", "4", "--reader-threads", "1"]


@pytest.fixture(scope="module")
def strict_model(tmp_path_factory):
    """A tiny model whose feature domain calls every slide out of domain (a threshold no distance is under)."""
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.pipeline.domain import METADATA_KEY, FeatureDomain

    folder = tmp_path_factory.mktemp("strict")
    width = int(load_model(write_tiny_model(folder / "plain.pt")).backbone.num_features)
    domain = FeatureDomain(np.zeros(width), np.eye(width), threshold=1e-6)
    return write_tiny_model(folder / "strict.pt", **{METADATA_KEY: domain.to_metadata()})


def test_predict_lines_say_out_of_domain_also_when_up_to_date(strict_model, cohort, tmp_path, capsys):
    slide = cohort / "tumor_001.tif"
    args = ["predict", slide, "--out", tmp_path / "o", "--model", strict_model, *FAST]
    code, out, err = run_cli_captured(args, capsys)
    assert code == 0, err
    assert "tumor_001: probability" in out and "OUT OF DOMAIN (unreliable)" in out, out
    assert "out of the model's domain" in err
    code, out, err = run_cli_captured(args, capsys)
    assert code == 0 and "up to date, done before: probability" in out and "OUT OF DOMAIN" in out, out
    record = json.loads((tmp_path / "o" / "tumor_001" / "prediction.json").read_text())
    assert record["in_domain"] is False and record["domain_distance"] > record["domain_threshold"] == 0.0
    assert len([w for w in record["summary"]["warnings"] if w.startswith("out of domain")]) == 1
    # the overlay says it in red under the title, with the reason (it was one plain phrase in the black title)
    from PIL import Image

    from wsi_vssm.outputs.overlay import WARNING_RGB

    png = Image.open(tmp_path / "o" / "tumor_001" / "overlay.png")
    band = np.asarray(png.convert("RGB"))[: int(png.text["wsi_vssm.panel"].split()[1])].astype(int)
    red = np.abs(band - np.array(WARNING_RGB) * 255).sum(axis=-1) < 60
    assert red.sum() > 200, red.sum()


def test_another_magnification_is_out_of_domain_on_every_line(model_file, cohort, tmp_path, capsys):
    """--target-mpp 4 with a 0.97 um/px model: out of domain, whatever the token features say."""
    code, out, err = run_cli_captured(["predict", cohort / "normal_001.tif", "--out", tmp_path / "o", "--model",
                                       model_file, *FAST], capsys)
    assert code == 0 and "OUT OF DOMAIN" in out and "another magnification" in err, (out, err)


def test_evaluate_counts_names_and_tables_out_of_domain_slides(strict_model, cohort, tmp_path, capsys):
    out_dir = tmp_path / "e"
    code, out, err = run_cli_captured(["evaluate", cohort, "--out", out_dir, "--model", strict_model, *FAST],
                                      capsys)
    assert code == 0, err
    assert "3 of 3 scored slide(s) are out of the model's domain" in err and "normal_001" in err, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["n_out_of_domain"] == 3
    with open(out_dir / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["in_domain"] for r in rows] == ["false"] * 3


def test_evaluate_with_slides_in_domain_has_no_domain_warning(cohort, tmp_path, capsys):
    """A model without a feature domain, reading the slides at its own resolution: in domain on the stain,
    nothing to warn about, a count of 0."""
    import torch

    from wsi_vssm.models.slide_model import SlideModel, save_model

    torch.manual_seed(0)
    model = tmp_path / "m4.pt"  # a model of 4 um/px: the cohort is read at the model's own resolution, fast
    save_model(SlideModel.create("micro", mpp=4.0, scan="cpu").eval(), model, metadata={"slide_threshold": 0.5})
    code, out, err = run_cli_captured(["evaluate", cohort, "--out", tmp_path / "e", "--model", model, "--device",
                                       "cpu", "--reader-threads", "1"], capsys)
    assert code == 0 and "out of the model's domain" not in err, err
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["n_out_of_domain"] == 0


def test_evaluate_says_how_many_slides_failed(model_file, cohort, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide,label\n{cohort / 'tumor_001.tif'},1\n{tmp_path / 'missing.tif'},0\n")
    code, out, err = run_cli_captured(["evaluate", manifest, "--out", tmp_path / "e", "--model", model_file,
                                       *FAST], capsys)
    assert code == 3 and "1 of 2 slide(s) failed" in err, err
    assert "note: model" in out  # the model's limits beside the slide that has a probability


def test_evaluate_with_no_slide_scored_prints_no_model_note(model_file, tmp_path, capsys):
    """With every slide failed, evaluate still printed the model's "trained on ... only" note (predict does not)."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide,label\n{tmp_path / 'missing.tif'},0\n")
    code, out, err = run_cli_captured(["evaluate", manifest, "--out", tmp_path / "e", "--model", model_file,
                                       *FAST], capsys)
    assert code == 3 and "1 of 1 slide(s) failed" in err and "AUC" in out, err
    assert "note: model" not in out, out


def test_evaluate_scores_the_test_part_of_a_split_manifest_and_says_what_it_used(model_file, cohort, tmp_path,
                                                                                 capsys):
    """evaluate scored every row of a manifest with a split column, training slides included ("AUC 1.000, n=10"
    for a MIL head trained on 6 of them), and metrics.json did not say which model or parameters made it."""
    import json

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide,label,split\n{cohort / 'tumor_001.tif'},1,train\n"
                        f"{cohort / 'normal_001.tif'},0,test\n")
    code, out, err = run_cli_captured(["evaluate", manifest, "--out", tmp_path / "e", "--model", model_file,
                                       *FAST], capsys)
    assert code == 0 and "evaluating the 1 test slide(s) of 2" in err, err
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["n"] == 1 and m["split"] == "test" and m["cohort"] == str(manifest)
    pred = json.loads((tmp_path / "e" / "normal_001" / "prediction.json").read_text())
    assert m["model"].pop("slide_head")["pool"] == "attention"  # metrics.json adds the slide head
    assert m["model"] == pred["model"] and m["parameters"]["region_px"] and m["version"] == pred["version"]
    assert m["parameters"]["precision"] == pred["parameters"]["precision_used"] == "fp32"
    assert not (tmp_path / "e" / "tumor_001").exists()  # the training slide was not predicted


def test_patients_of_another_split_say_how_to_evaluate_them(model_file, cohort, tmp_path, capsys):
    manifest, patients = tmp_path / "m.csv", tmp_path / "patients.csv"
    manifest.write_text(f"slide,label,split\n{cohort / 'tumor_001.tif'},1,train\n"
                        f"{cohort / 'normal_001.tif'},0,test\n")
    patients.write_text("patient,slide\np1,tumor_001\np2,normal_001\n")
    code, _, err = run_cli_captured(["evaluate", manifest, "--patients", patients, "--out", tmp_path / "e",
                                     "--model", model_file, *FAST], capsys)
    assert code == 1 and err.count("\n") == 2 and "tumor_001" in err, err  # the split line, then the error
    assert "(evaluating the test rows only; --split all takes every slide)" in err, err


def test_a_split_the_table_lacks_is_a_usage_error(model_file, cohort, tmp_path, capsys):
    """`--split test` on a table without a split column exited 1, unlike every other rejected option value (2)."""
    code, _, err = run_cli_captured(["evaluate", cohort, "--split", "test", "--out", tmp_path / "e", "--model",
                                     model_file, *FAST], capsys)
    assert code == 2 and err.count("\n") == 1 and "--split test: " in err and "no split column" in err, err
