"""Paths given on the command line that are not what they seem: one file named twice, a pipe or a link loop
named like a slide, an empty `--out`, a TIFF header claiming far more pixels than it stores, a patients table
with capitalised headers. Each is one line and a documented exit code (docs/cohorts.md)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys

import numpy as np
import pytest
import tifffile
from conftest import assert_one_line_error, run_cli_captured

FAST = ["--device", "cpu", "--target-mpp", "4", "--region-px", "512", "--overlap-px", "64", "--reader-threads", "1"]


@pytest.fixture(scope="module")
def slide(cohort):
    return next(cohort.glob("*.tif"))


def _predict(args, model_file, out, capsys):
    return run_cli_captured(["predict", *args, "--out", out, "--model", model_file, *FAST], capsys)


def test_a_folder_of_slides_is_its_slide_files(cohort, model_file, tmp_path, capsys):
    """`predict DIR` (as CLAM and TRIDENT take one) was "a directory, but not an OME-Zarr store", exit 1. Its
    sub-folders (the cohort's annotations/, an output folder) are not walked."""
    code, out, err = _predict([cohort], model_file, tmp_path / "o", capsys)
    assert code == 0, err
    names = sorted(p.stem for p in cohort.glob("*.tif"))
    assert sorted(line.split(":")[0] for line in out.splitlines() if "probability" in line) == names, out
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not a slide")
    code, _, err = _predict([tmp_path / "empty", next(cohort.glob("*.tif"))], model_file, tmp_path / "o2", capsys)
    assert code == 3 and "empty: a folder with no slide files directly in it" in err, err  # fails alone


def test_a_slide_name_near_the_file_system_limit_runs(slide, model_file, tmp_path, capsys):
    """A 240-byte name (255 is legal) failed: "cannot start: .state/.tmp-<name>.predict.json.x: File name too
    long", the temporary's prefix and suffix pushing its name past 255 bytes; from 243 bytes the state and lock
    files themselves (`<name>.predict.lock`) were too long."""
    name = "\u6dcb" * 20 + "x" * 191  # 60 bytes of CJK, then ASCII: 251 bytes, 255 with `.tif`
    long = tmp_path / "in" / f"{name}.tif"
    long.parent.mkdir()
    shutil.copy(slide, long)
    code, out, err = _predict([long], model_file, tmp_path / "o", capsys)
    assert code == 0 and f"{name}: probability" in out, err
    assert (tmp_path / "o" / name / "prediction.json").is_file()
    assert not list((tmp_path / "o").rglob(".tmp-*")), "temporaries left behind"
    code, out, _ = _predict([long], model_file, tmp_path / "o", capsys)  # its state is found again: up to date
    assert code == 0 and "up to date" in out, out


def test_one_file_named_twice_runs_once(slide, model_file, tmp_path, capsys):
    """Overlapping globs (`*.tif n*.tif`) gave the same file twice: it failed as 'rename one' (exit 3)."""
    code, out, err = _predict([slide, slide, str(slide.parent / "." / slide.name)], model_file, tmp_path / "o",
                              capsys)
    assert code == 0, err
    assert out.count(f"{slide.stem}: probability") == 1
    assert err.count("given twice") == 2 and "analysed once" in err and "error" not in err


def test_two_files_of_one_name_still_collide(slide, model_file, tmp_path, capsys):
    other = tmp_path / "elsewhere" / slide.name
    other.parent.mkdir()
    shutil.copy(slide, other)
    code, _, err = _predict([slide, other], model_file, tmp_path / "o", capsys)
    assert code == 3 and "rename one" in err


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs")
def test_a_pipe_named_like_a_slide_fails_alone_without_hanging(slide, model_file, tmp_path, capsys):
    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)
    out = tmp_path / "o"
    code, stdout, err = _predict([fifo, slide], model_file, out, capsys)
    assert code == 3
    assert f"wsi-vssm: error: {fifo}: not a regular file: a named pipe (FIFO)" in err
    assert f"{slide.stem}: probability" in stdout
    assert not (out / ".state" / "pipe.predict.json").exists()
    code, _, err = run_cli_captured(["info", fifo], capsys)
    assert code == 1 and "named pipe" in err and "Traceback" not in err


def test_every_slide_failing_says_none_is_done(model_file, tmp_path, capsys):
    code, _, err = _predict([tmp_path / "a.svs", tmp_path / "b.svs"], model_file, tmp_path / "o", capsys)
    assert code == 3 and "2 of 2 slide(s) failed; none is done" in err and "the others are done" not in err


@pytest.mark.parametrize("command", [["predict", "x.svs", "--out"], ["evaluate", "x", "--out"],
                                     ["extract", "x.svs", "--model", "default", "--out"],
                                     ["synth", "--slides", "1"], ["run", "RECIPE", "--out"],
                                     ["train", "cells", "--data", "IN", "--valid", "IN", "--out"],
                                     ["train", "mil", "--features", "IN", "--labels", "LABELS", "--out"],
                                     ["export", "--onnx"]])
def test_an_empty_output_path_is_a_usage_error(command, tmp_path, capsys, monkeypatch):
    """`--out "$OUT"` with OUT unset wrote into the current folder (or next to it)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "labels.csv").write_text("slide,label\na,1\n", encoding="utf-8")
    (inputs / "recipe.toml").write_text('[recipe]\nstages = ["cells"]\n', encoding="utf-8")
    names = {"IN": inputs, "LABELS": inputs / "labels.csv", "RECIPE": inputs / "recipe.toml"}
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli_captured([names.get(a, a) for a in command] + [""], capsys)
    assert code == 2 and "is empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_tiff_stating_a_huge_size_over_few_tiles_is_corrupt_not_empty(model_file, tmp_path, capsys):
    """A header saying 200,000 px over 4 stored tiles was read as white background: 'no tissue', exit 0."""
    path = tmp_path / "liar.tif"
    tifffile.imwrite(path, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb",
                     resolution=(5000, 5000), resolutionunit="CENTIMETER", metadata=None)
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tf:
        for name in ("ImageWidth", "ImageLength"):
            tag = tf.pages[0].tags[name]
            struct.pack_into("<HHII", data, tag.valueoffset - 8, tag.code, 4, 1, 200_000)
    path.write_bytes(bytes(data))
    code, stdout, err = _predict([path], model_file, tmp_path / "o", capsys)
    assert code == 1 and "no tissue" not in stdout + err
    assert f"{path}: damaged TIFF directory" in err and "lists 4" in err and "Traceback" not in err


def test_patients_table_headers_match_in_any_case(tmp_path):
    from wsi_vssm.outputs.staging import read_patients_csv

    table = tmp_path / "patients.csv"
    table.write_text("Patient,SLIDE,Notes\np1,node_0.tif,x\np1,node_1,y\n", encoding="utf-8")
    assert read_patients_csv(table, cohort_slides=["node_0", "node_1"]) == {"p1": ["node_0", "node_1"]}


def test_a_slide_warning_is_printed_once(slide, model_file, tmp_path, capsys):
    """The slide is opened more than once (tissue, regions): its override warning came out twice."""
    code, _, err = _predict([slide, "--mpp", "2.1"], model_file, tmp_path / "o", capsys)
    assert code == 0 and err.count("using the given 2.1 um/px instead") == 1, err


def test_a_tumour_call_on_almost_no_cells_is_said_on_the_terminal(slide, model_file, tmp_path, capsys):
    """The warning went to prediction.json alone: a slide called tumour with nothing in its overlay, lesions or
    heatmap above the cell threshold (a MIL head attached to another cell head) gave no sign on the terminal."""
    code, out, err = _predict([slide, "--threshold", "0", "--cell-threshold", "0.999"], model_file, tmp_path / "o",
                              capsys)
    assert code == 0 and "-> tumor" in out, err
    assert err.count("the tumour call rests on 0 cell(s) at or above the cell threshold 0.999") == 1, err
    assert "no cell of the heatmap looks like tumour, so doubt the call" in err, err  # "check the heatmap" led nowhere
    assert "-> tumor (doubtful: 0 cell(s) at the cell threshold)" in out, out
    # a rerun's "up to date" line and `info OUT` lost the note (the first run's warning is not repeated there)
    code, out, err = _predict([slide, "--threshold", "0", "--cell-threshold", "0.999"], model_file, tmp_path / "o",
                              capsys)
    assert code == 0 and "up to date" in out and "(doubtful: 0 cell(s) at the cell threshold)" in out, out
    from wsi_vssm.commands.output_info import format_output_info, output_info

    assert "-> tumor (doubtful: 0 cell(s) at the cell threshold)" in format_output_info(output_info(tmp_path / "o"))


def test_a_run_far_from_the_models_resolution_says_so(slide, model_file, tmp_path, capsys):
    """`--target-mpp 4` with a model trained at 0.97 um/px: predict said nothing (extract warns)."""
    from wsi_vssm.commands.options import domain_note
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.pipeline.predict import PredictParams

    code, out, _ = _predict([slide], model_file, tmp_path / "o", capsys)
    model = load_model(model_file)
    assert code == 0 and f"read the slides at 4 um/px (--target-mpp), not the model's {model.mpp:g}" in out
    assert "--target-mpp" not in domain_note(model) + domain_note(model, PredictParams(target_mpp=model.mpp))


def test_ctrl_c_says_how_to_resume(slide, capsys, monkeypatch):
    """click turns Ctrl-C into Abort, which printed only 'aborted'."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("wsi_vssm.io.open_slide", interrupted)
    code, _, err = run_cli_captured(["info", slide], capsys)
    assert code == 130 and "interrupted; nothing was kept" in err  # `info` keeps nothing



def test_an_interrupted_training_says_how_to_continue(tmp_path, capsys, monkeypatch):
    """Ctrl-C in `train cells` said "finished slides are kept", and an empty checkpoint (torch's EOFError,
    which click also turns into an abort) was reported as Ctrl-C, exit 130."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("wsi_vssm.training.cells.train_cells", interrupted)
    data = tmp_path / "p"
    (data / "0").mkdir(parents=True)
    (data / "1").mkdir()
    args = ["train", "cells", "--data", data, "--valid", data, "--out", tmp_path / "m.pt"]
    code, _, err = run_cli_captured(args, capsys)
    assert code == 130, err
    assert "every finished epoch is kept (none before the first ends): rerun the same command with --resume" in err

    def cut_short(*args, **kwargs):
        raise EOFError("Ran out of input")

    monkeypatch.setattr("wsi_vssm.training.cells.train_cells", cut_short)
    assert_one_line_error(args, capsys, 1, "unexpected end of a file (Ran out of input)")


def test_a_tiny_cohorts_auc_interval_is_flagged(cohort, model_file, tmp_path, capsys):
    """Four perfectly separated slides printed 'AUC 1.000 (95% CI 1.000-1.000)' with nothing to temper it."""
    code, out, err = run_cli_captured(["evaluate", cohort, "--out", tmp_path / "ev", "--model", model_file,
                                       "--bootstrap", "200", *FAST], capsys)
    assert code == 0 and "AUC " in out
    assert "the AUC rests on 1 tumour and 2 normal slides" in err and "not a reliable measure" in err


def test_the_auc_interval_is_flagged_below_20_slides_a_class():
    """At 10-15 slides a class the percentile bootstrap covered the true AUC only 89-93% of the time (simulated
    binormal cohorts) and nothing was said from 10 on."""
    from wsi_vssm.runs.evaluate import EvaluationResult
    from wsi_vssm.runs.report_warnings import small_cohort_warning

    def result(n, delong=None):
        rows = [{"status": "done", "probability": 0.5, "label": y} for y in (0, 1) for _ in range(n)]
        return EvaluationResult({"auc": 0.8, "auc_ci95_delong": delong}, rows)

    assert "rests on 15 tumour and 15 normal slides" in small_cohort_warning(result(15))
    assert small_cohort_warning(result(20)) is None
    # the interval that covers closer to 95% (bench/auc_interval.py) is quoted where it is defined
    assert "DeLong's interval 0.612-0.921 (auc_ci95_delong)" in small_cohort_warning(result(15, [0.6123, 0.9211]))
    assert "DeLong" not in small_cohort_warning(result(15))


def test_mosaic_slides_tiled_from_the_same_patches_are_flagged(tmp_path):
    """bench/detector.py's 32 x 32 held-back mosaics: each normal slide held 70% of one 1,000-patch pool, and one
    label-0 patch the model reads as tumour sat in 28 of the 40 (2026-12-05); nothing said the slides were not
    independent."""
    import json

    from wsi_vssm.runs.evaluate import EvaluationResult
    from wsi_vssm.runs.report_warnings import shared_patches_warning

    def warning(slides):
        path = tmp_path / "mosaic.json"
        path.write_text(json.dumps({"slides": slides}))
        return shared_patches_warning(EvaluationResult({"mosaics": str(path)}, [], items="mosaic slides"))

    def slide(label, *patches):
        return {"name": f"{label}_{''.join(patches)}", "label": label, "patches": [list(patches), [None]]}

    shared = [slide("normal", "a", "b", "c", "d"), slide("normal", "a", "b", "c", "e"), slide("tumor", "x", "y")]
    assert "the 2 normal mosaic slides are tiled from largely the same patches: a typical one of their 5 label-0 " \
           "patches sits in 100% of the other normal slides" in warning(shared)
    assert warning([slide("normal", p) for p in "abcd"]) is None  # 4 slides that share nothing: no line
    assert warning([slide("normal", p) for p in "ab"] + [slide("normal", "a", "c")]) is None  # 1 of 3 recurs
    assert warning([{"name": "n1", "label": "normal", "patches": ["patch_a.png"]},  # not rows: no verdict
                    {"name": "n2", "label": "normal", "patches": ["patch_a.png"]}]) is None
    assert warning([{"name": "n", "label": "normal", "index": [[0, 1]]}]) is None  # no patch names: no line
    (tmp_path / "nodes.json").write_text(json.dumps({"nodes": []}))  # a patients cohort's mosaic.json
    assert shared_patches_warning(EvaluationResult({"mosaics": str(tmp_path / "nodes.json")}, [])) is None
    assert shared_patches_warning(EvaluationResult({"mosaics": None}, [])) is None


def test_a_writers_default_dpi_is_named():
    from wsi_vssm.io.base import ignored_mpp

    note = ignored_mpp({"tiff.XResolution": "72", "tiff.ResolutionUnit": "2"})
    assert "implausible 352.8 um/px (TIFF resolution tags: 72 dpi, an image writer's default" in note
    assert "dpi" not in ignored_mpp({"openslide.mpp-x": "50"})


def test_annotation_files_match_slide_names_exactly_and_gaps_are_named(cohort, tmp_path, recwarn):
    """`glob(name + ext)` let `tumor[1]` take `tumor1.xml` and missed `x.XML`; a tumour slide without its file
    silently became a normal one in the FROC."""
    from wsi_vssm.runs.cohort_froc import read_cohort_annotations

    xml = (cohort / "annotations" / "tumor_001.xml").read_bytes()
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "tumor1.xml").write_bytes(xml)
    (ann / "upper.XML").write_bytes(xml)
    (ann / "both.xml").write_bytes(xml)
    (ann / "both.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    folders = {n: n for n in ("tumor[1]", "upper", "both", "normal")}
    found = read_cohort_annotations(ann, folders, {"tumor[1]": 1, "upper": 1, "both": 1, "normal": 0})
    assert sorted(found) == ["both", "upper"]  # exact names, any extension case; tumor[1] is no wildcard
    notes = [str(w.message) for w in recwarn]
    assert any("both (both.xml, both.geojson: both.xml used)" in n for n in notes), notes
    assert any("1 slide(s) labelled tumour have no tumour annotation" in n and ": tumor[1];" in n for n in notes)


def test_slide_names_that_are_the_runs_own_files_or_a_link_are_refused(slide, model_file, tmp_path, capsys):
    """`metrics.json.tif` made OUT/metrics.json a folder, so evaluate's report failed "Is a directory" until the
    slide was renamed; `.state.svs` wrote into the state folder; an OUT/<slide> made a symbolic link wrote every
    output wherever it pointed."""
    (tmp_path / "in").mkdir()
    for name in ("metrics.json", ".state", "Predictions.csv", "s1"):
        shutil.copy(slide, tmp_path / "in" / f"{name}.tif")
    (tmp_path / "o").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "o" / "s1")
    code, _, err = _predict(sorted((tmp_path / "in").iterdir()), model_file, tmp_path / "o", capsys)
    assert code == 3 and err.count("is that of a file or folder the run keeps in") == 3, err
    assert "its output folder" in err and "is a symbolic link" in err, err
    assert not (tmp_path / "o" / "metrics.json").exists() and not list((tmp_path / "elsewhere").iterdir())


def test_table_cells_a_spreadsheet_would_run_are_written_as_text(tmp_path):
    """A slide or patient named `=HYPERLINK(...)` or `=cmd|...` was written as it is: Excel runs such a cell (CSV
    injection). A `'` goes before a formula-like start, and this package reads the names back unchanged."""
    from wsi_vssm.outputs.report import read_predictions_csv, write_predictions_csv
    from wsi_vssm.outputs.staging import read_stages_csv, write_stages_csv

    names = ['=HYPERLINK("http://x","y")', "+1+1", "-2", "@SUM(1)", "'=quoted", "plain"]
    write_predictions_csv(tmp_path / "p.csv", [{"slide": n, "status": "failed", "error": f"{n}: bad"}
                                               for n in names])
    text = (tmp_path / "p.csv").read_text()
    assert "\n'+1+1," in text and "'@SUM(1)" in text and "\n'-2," in text and "\nplain," in text, text
    assert [(r["slide"], r["error"]) for r in read_predictions_csv(tmp_path / "p.csv")] == [
        (n, f"{n}: bad") for n in names]
    write_stages_csv(tmp_path / "s.csv", {'=cmd|" /C calc"!A0': "pN0", "p2": "pN1"})
    assert "'=cmd" in (tmp_path / "s.csv").read_text()
    assert [r["patient"] for r in read_stages_csv(tmp_path / "s.csv")] == ['=cmd|" /C calc"!A0', "p2"]


def test_an_output_folder_that_is_a_file_is_refused_before_inference(cohort, slide, model_file, tmp_path, capsys,
                                                                     monkeypatch):
    """OUT/<slide> a file: predict ran the whole slide, then failed "File exists". Now predict refuses it in one
    line before its model loads; evaluate fails that slide alone before its inference, writing no state (so it
    runs once the file is moved), and does the others."""
    from wsi_vssm.commands import options
    from wsi_vssm.runs.state import read_state

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / slide.stem).write_text("not a folder")
    real = options.load_cli_model
    monkeypatch.setattr(options, "load_cli_model", lambda *a: pytest.fail("the model was loaded"))
    assert_one_line_error(["predict", slide, "--out", tmp_path / "o", "--model", model_file, *FAST], capsys, 1,
                          f"{slide}: its output folder {tmp_path / 'o' / slide.stem} is a file, not a folder")
    monkeypatch.setattr(options, "load_cli_model", real)
    code, out, err = run_cli_captured(["evaluate", cohort, "--out", tmp_path / "o", "--model", model_file,
                                       "--bootstrap", "100", *FAST], capsys)
    assert code == 3 and "Traceback" not in err, err
    assert f"its output folder {tmp_path / 'o' / slide.stem} is a file, not a folder" in err, err
    assert out.count(": probability") == 2, out  # the other slides are done
    assert read_state(tmp_path / "o", "predict", slide.stem) is None


def test_a_tumour_slide_without_a_tumour_annotation_is_told_why(tmp_path, recwarn):
    """The warning said "no file named like the slide, or no tumour area in it" and no more: which, what classes
    the file held, and that a file beside it in a format this does not read (napari's shapes CSV) is not read."""
    from wsi_vssm.runs.cohort_froc import read_cohort_annotations

    ann = tmp_path / "ann"
    ann.mkdir()
    square = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    (ann / "tumor_001.geojson").write_text(json.dumps({"type": "Feature", "properties": {"classification": {
        "name": "Pathologist JB"}}, "geometry": {"type": "Polygon", "coordinates": [square]}}))
    (ann / "tumor_002.csv").write_text("index,shape-type,vertex-index,axis-0,axis-1\n")
    (ann / "tumor_002.ndpi").write_bytes(b"")  # the slide itself beside its annotations: not named as unread
    inner = [[10, 10], [20, 10], [20, 20], [10, 20], [10, 10]]
    (ann / "tumor_003.geojson").write_text(json.dumps([
        {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
         "geometry": {"type": "Polygon", "coordinates": [inner]}},
        {"type": "Feature", "properties": {"classification": {"name": "Exclusion"}},
         "geometry": {"type": "Polygon", "coordinates": [square]}}]))
    slides = ("tumor_001", "tumor_002", "tumor_003")
    read_cohort_annotations(ann, {s: s for s in slides}, dict.fromkeys(slides, 1))
    notes = [str(w.message) for w in recwarn]
    assert any("(no file named like the slide; not read, in a format this does not read: tumor_002.csv): "
               "tumor_002;" in n for n in notes), notes
    assert any("(no tumour class in its file:" in n and "tumor_001.geojson ('Pathologist JB')" in n for n in notes)
    assert any("(its tumour areas lie wholly in its excluded ones): tumor_003.geojson ('Exclusion', 'Tumor')" in n
               for n in notes), notes


def test_slides_whose_names_differ_only_in_case_are_one_folder_and_refused(slide, model_file, tmp_path, capsys):
    """`predict a/Slide1.tif b/slide1.tif` ran both into OUT/Slide1 and OUT/slide1: one folder (and one state
    file) on macOS's and Windows' case-insensitive file systems, where the second slide overwrote the first."""
    for sub, name in (("a", "Slide1"), ("b", "slide1")):
        (tmp_path / sub).mkdir()
        shutil.copy(slide, tmp_path / sub / f"{name}.tif")
    code, _, err = _predict([tmp_path / "a" / "Slide1.tif", tmp_path / "b" / "slide1.tif"], model_file,
                            tmp_path / "o", capsys)
    assert code == 3 and "slide1.tif: another slide of this run has the name 'Slide1' (the same folder as " \
                          "'slide1' on a case-insensitive file system)" in err, err
    assert (tmp_path / "o" / "Slide1").is_dir() and not (tmp_path / "o" / "slide1").exists()
