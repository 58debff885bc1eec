"""`evaluate` into an OUT whose metrics.json holds another cohort's (or split's, or patch folder's) figures says,
before it runs, that it replaces them and predictions.csv (silent before: a user lost a patch folder's scores)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_cli_captured, write_patch_folder

from wsi_vssm.runs.cohort_table import replaced_cohort_warning


def _metrics(out, **keys) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(keys))


def test_the_line_names_the_figures_it_replaces_and_what_stays(tmp_path):
    a, b = os.path.abspath(tmp_path / "a.csv"), tmp_path / "b.csv"
    assert replaced_cohort_warning(tmp_path / "none", b, None) is None  # nothing there yet
    _metrics(tmp_path / "same", cohort=a, split="test")
    assert replaced_cohort_warning(tmp_path / "same", a, "test") is None  # a rerun of the same figures
    line = replaced_cohort_warning(tmp_path / "same", a, "valid")
    assert f"holds the figures of {a} (split test)" in line and "(split valid)" in line
    _metrics(tmp_path / "slides", cohort=a, split=None)
    line = replaced_cohort_warning(tmp_path / "slides", b, None)
    assert f"of {a}: this run replaces them and predictions.csv with those of {b}" in line
    assert "its slide folders stay" in line and "use another --out" in line
    _metrics(tmp_path / "patches", cohort=a, split=None, model_patches={"either": 0})
    assert "slide folders" not in replaced_cohort_warning(tmp_path / "patches", b, None)  # its scores go
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{not json")
    assert replaced_cohort_warning(tmp_path / "bad", b, None) is None
    _metrics(tmp_path / "old", n=3)  # a file from before `cohort` was recorded: nothing to compare
    assert replaced_cohort_warning(tmp_path / "old", b, None) is None


def test_a_second_patch_folder_into_the_same_out_is_warned_about_once(model_file, tmp_path, capsys):
    write_patch_folder(tmp_path / "p", 4, 0)
    write_patch_folder(tmp_path / "q", 4, 1)
    args = ["--mpp", "0.97", "--model", model_file, "--bootstrap", "100", "--out", tmp_path / "ev"]
    code, _, err = run_cli_captured(["evaluate", tmp_path / "p", *args], capsys)
    assert code == 0 and "holds the figures" not in err
    code, _, err = run_cli_captured(["evaluate", tmp_path / "q", *args], capsys)
    lines = [ln for ln in err.splitlines() if "holds the figures" in ln]
    assert code == 0 and len(lines) == 1 and f"of {tmp_path / 'p'}: this run replaces" in lines[0], err
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["cohort"] == str(tmp_path / "q")
    code, _, err = run_cli_captured(["evaluate", tmp_path / "q", *args], capsys)  # again: its own figures
    assert code == 0 and "holds the figures" not in err


def test_a_slide_cohort_warns_before_its_first_slide(model_file, cohort, tmp_path):
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.pipeline.predict import PredictParams
    from wsi_vssm.runs.evaluate import evaluate_cohort

    out = tmp_path / "ev"
    _metrics(out, cohort=str(tmp_path / "other.csv"), split=None)
    with pytest.warns(UserWarning, match="other.csv: this run replaces them") as caught:
        evaluate_cohort(cohort, load_model(model_file), out, PredictParams(mpp=2.0), n_boot=20)
    first = next(i for i, w in enumerate(caught) if "holds the figures" in str(w.message))
    assert first == 0  # said before any slide's warning
    assert json.loads((out / "metrics.json").read_text())["cohort"] == str(cohort / "reference.csv")


def test_one_slide_under_several_names_is_said_to_count_again(cohort, model_file, tmp_path, capsys):
    """A slide listed under two more names (a copy, a symbolic link) was scored three times, and the AUC counted
    each, without a word; patch folders had this warning (`repeated_patches`)."""
    import json
    import shutil

    from conftest import run_cli_captured

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("tumor_001", "normal_001", "normal_002"):
        shutil.copy(cohort / f"{name}.tif", slides)
    shutil.copy(cohort / "tumor_001.tif", slides / "tumor_001_rescan.tif")
    (slides / "tumor_001_link.tif").symlink_to(slides / "tumor_001.tif")
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide,label\nslides/tumor_001.tif,1\nslides/normal_001.tif,0\nslides/normal_002.tif,0\n"
                        "slides/tumor_001_rescan.tif,1\nslides/tumor_001_link.tif,1\n")
    code, _, err = run_cli_captured(["evaluate", manifest, "--model", model_file, "--out", tmp_path / "ev",
                                     "--device", "cpu", "--target-mpp", "4", "--region-px", "512", "--bootstrap",
                                     "100"], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "ev" / "metrics.json").read_text())["repeated_slides"]
    assert (rep["groups"], rep["repeats"], rep["conflicting_labels"]) == (1, 2, 0)
    said = [line for line in err.splitlines() if "another slide's file" in line]
    assert len(said) == 1 and "2 of the 5 scored slides are another slide's file under another name" in said[0]
    manifest.write_text("slide,label\nslides/tumor_001.tif,1\nslides/normal_001.tif,0\nslides/normal_002.tif,0\n")
    code, _, err = run_cli_captured(["evaluate", manifest, "--model", model_file, "--out", tmp_path / "ev2",
                                     "--device", "cpu", "--target-mpp", "4", "--region-px", "512", "--bootstrap",
                                     "100"], capsys)
    assert code == 0 and "another slide's file" not in err
    assert json.loads((tmp_path / "ev2" / "metrics.json").read_text())["repeated_slides"] is None


def test_repeated_slides_compares_slide_files_only(tmp_path):
    """OME-Zarr folders are fingerprinted by their top metadata files only, which two different slides can
    share: they were reported as copies of each other."""
    from wsi_vssm.runs.cohort_table import repeated_slides
    from wsi_vssm.runs.state import write_state

    out = tmp_path / "ev"
    for name in ("a", "b"):
        (tmp_path / f"{name}.tif").write_bytes(b"same")
        (tmp_path / f"{name}.ome.zarr").mkdir()
    rows = [{"slide": n, "label": 1} for n in ("a", "b")]
    for files, want in ((".tif", 1), (".ome.zarr", None)):
        for name in ("a", "b"):
            write_state(out, "predict", name, {"status": "done", "abspath": str(tmp_path / f"{name}{files}"),
                                               "input": {"sha256": "f" * 64}})
        got = repeated_slides(out, "predict", rows, {"a": "a", "b": "b"})
        assert (got and got["repeats"]) == want
    write_state(out, "predict", "a", {"status": "done", "abspath": str(tmp_path / "a.tif"), "input": "odd"})
    assert repeated_slides(out, "predict", rows, {"a": "a", "b": "b"}) is None  # a foreign state: no traceback
