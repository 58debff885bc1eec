"""Per-slide resolution in a cohort run: `--fallback-mpp` for the slides that store none, and a manifest's `mpp`
column. A folder mixing slides with and without a stated resolution runs in one command, and a rerun redoes only
the slides whose resolution changed."""

from __future__ import annotations

import json
import shutil

import pytest
import tifffile
from conftest import assert_one_line_error, run_cli_captured

from wsi_vssm.runs.state import read_state

FAST = ["--device", "cpu", "--target-mpp", "4", "--region-px", "512", "--overlap-px", "64", "--reader-threads", "1"]


@pytest.fixture
def mixed(cohort, tmp_path):
    """A folder of two slides with the same pixels: `stated.tif` (2 um/px in its tags) and `bare.tif` (none)."""
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(cohort / "tumor_001.tif", folder / "stated.tif")
    tifffile.imwrite(folder / "bare.tif", tifffile.imread(cohort / "tumor_001.tif"), tile=(256, 256),
                     photometric="rgb", metadata=None)
    return folder


def _mpp(out, name) -> tuple[float, str]:
    rec = json.loads((out / name / "prediction.json").read_text())
    return rec["mpp"]["slide"], rec["mpp"]["slide_source"]


def _started(out, name) -> str:
    return read_state(out, "predict", name)["started"]


def test_fallback_mpp_completes_a_mixed_folder_and_reruns_only_its_slides(mixed, model_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["predict", mixed, "--out", out, "--model", model_file, *FAST]
    code, _, err = run_cli_captured(args, capsys)
    assert code == 3 and "bare.tif" in err and "no resolution" in err and "--fallback-mpp" in err, err
    stated_run = _started(out, "stated")

    code, _, err = run_cli_captured([*args, "--fallback-mpp", "2"], capsys)  # the failed one now runs
    assert code == 0, err
    assert _started(out, "stated") == stated_run  # its file states 2 um/px: up to date, not redone
    assert _mpp(out, "stated")[1] not in ("fallback", "user")
    assert _mpp(out, "bare") == (2.0, "fallback")
    a, b = (json.loads((out / n / "prediction.json").read_text())["probability"] for n in ("stated", "bare"))
    assert a == pytest.approx(b, abs=1e-6)  # the same pixels at the same resolution
    bare_run = _started(out, "bare")

    code, out_text, _ = run_cli_captured([*args, "--fallback-mpp", "2"], capsys)
    assert code == 0 and _started(out, "bare") == bare_run and _started(out, "stated") == stated_run

    code, out_text, err = run_cli_captured([*args, "--fallback-mpp", "1.5"], capsys)  # another fallback
    assert code == 0, err
    assert _started(out, "stated") == stated_run and _started(out, "bare") != bare_run
    assert _mpp(out, "bare") == (1.5, "fallback")
    assert "read at the fallback resolution 2.0 um/px; this run's --fallback-mpp is 1.5: running it again" in \
        out_text + err
    bare_run = _started(out, "bare")

    # the fallback left out again: the slides done at one are kept (a rerun could only fail them)
    code, out_text, err = run_cli_captured(args, capsys)
    assert code == 0 and _started(out, "bare") == bare_run and _started(out, "stated") == stated_run, err
    assert _mpp(out, "bare") == (1.5, "fallback")


def test_a_manifest_mpp_column_sets_each_rows_resolution(mixed, model_file, tmp_path, capsys):
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("slide,label,mpp\nslides/stated.tif,1,\nslides/bare.tif,1,2.0\n")
    out = tmp_path / "out"
    args = ["evaluate", manifest, "--out", out, "--model", model_file, "--bootstrap", "100", *FAST]
    code, _, err = run_cli_captured(args, capsys)
    assert code == 0, err
    assert _mpp(out, "bare") == (2.0, "user") and _mpp(out, "stated")[1] not in ("fallback", "user")
    runs = {n: _started(out, n) for n in ("stated", "bare")}
    assert read_state(out, "predict", "bare")["params"]["slide_mpp"] == 2.0
    assert read_state(out, "predict", "stated")["params"]["slide_mpp"] is None

    code, _, err = run_cli_captured(args, capsys)
    assert code == 0 and {n: _started(out, n) for n in runs} == runs  # both up to date

    manifest.write_text("slide,label,mpp\nslides/stated.tif,1,\nslides/bare.tif,1,1.5\n")  # one row changed
    code, _, err = run_cli_captured(args, capsys)
    assert code == 0, err
    assert _started(out, "stated") == runs["stated"] and _started(out, "bare") != runs["bare"]
    assert _mpp(out, "bare") == (1.5, "user")


@pytest.mark.parametrize("value", ["abc", "0", "200", "-1", "0.25x"])
def test_a_bad_manifest_mpp_names_the_row(mixed, model_file, tmp_path, capsys, value):
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"slide,label,mpp\nslides/stated.tif,1,\nslides/bare.tif,0,{value}\n")
    assert_one_line_error(["evaluate", manifest, "--out", tmp_path / "o", "--model", model_file, *FAST], capsys, 1,
                          "cohort.csv, line 3", f"mpp {value!r}", "microns per pixel")


def test_extract_takes_a_fallback_mpp_for_the_slides_that_state_none(mixed, model_file, tmp_path, capsys):
    import zarr

    out = tmp_path / "feats"
    args = ["extract", mixed, "--out", out, "--model", model_file, *FAST]
    code, _, err = run_cli_captured(args, capsys)
    assert code == 3 and "bare.tif" in err and "no resolution" in err
    code, _, err = run_cli_captured([*args, "--fallback-mpp", "2"], capsys)
    assert code == 0, err
    attrs = [dict(zarr.open_group(str(out / f"{n}.zarr"), mode="r").attrs) for n in ("stated", "bare")]
    assert attrs[0]["slide_mpp"] == attrs[1]["slide_mpp"] == 2.0
    assert read_state(out, "extract", "bare")["result"]["mpp_source"] == "fallback"


@pytest.mark.parametrize("command", ["predict", "extract", "evaluate"])
def test_mpp_and_fallback_mpp_together_are_refused(mixed, model_file, tmp_path, capsys, command):
    target = mixed if command != "evaluate" else mixed.parent / "none.csv"
    if command == "evaluate":
        target.write_text("slide,label\nslides/stated.tif,1\n")
    assert_one_line_error([command, target, "--out", tmp_path / "o", "--model", model_file, "--mpp", "1",
                           "--fallback-mpp", "2", *FAST], capsys, 2, "--mpp", "--fallback-mpp", "give one")
    assert not (tmp_path / "o").exists()


def test_evaluate_records_the_fallback_in_metrics(mixed, model_file, tmp_path, capsys):
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("slide,label\nslides/stated.tif,1\nslides/bare.tif,0\n")
    out = tmp_path / "out"
    code, _, err = run_cli_captured(["evaluate", manifest, "--out", out, "--model", model_file, "--bootstrap", "100",
                                     "--fallback-mpp", "2", *FAST], capsys)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["parameters"]["fallback_mpp"] == 2.0 and m["n"] == 2


def test_info_on_the_folder_says_which_resolution_was_given_and_which_outputs_are_older(mixed, model_file, tmp_path,
                                                                                      capsys):
    """`info OUT` names the slides read at a resolution the file did not state, and a slide whose redo failed
    while its folder still holds the earlier run's outputs (the cohort reports ignore them; a person would not)."""
    out = tmp_path / "out"
    args = ["predict", mixed, "--out", out, "--model", model_file, *FAST]
    assert run_cli_captured([*args, "--fallback-mpp", "2"], capsys)[0] == 0
    code, text, _ = run_cli_captured(["info", out], capsys)
    lines = {line.split(":")[0].strip(): line for line in text.splitlines()[1:]}
    assert code == 0 and "(read at the fallback 2 um/px)" in lines["bare"] and "read at" not in lines["stated"]
    (mixed / "bare.tif").write_bytes((mixed / "bare.tif").read_bytes()[:2000])  # the file changes and breaks
    assert run_cli_captured([*args, "--fallback-mpp", "2"], capsys)[0] == 3
    code, text, _ = run_cli_captured(["info", out, "--json"], capsys)
    entries = {s["slide"]: s for s in json.loads(text)["slides"]}
    assert entries["bare"]["status"] == "failed" and entries["bare"]["earlier_outputs"] is True
    assert entries["stated"]["earlier_outputs"] is False and entries["stated"]["mpp_given"] is None
    assert "still holds an earlier run's outputs" in run_cli_captured(["info", out], capsys)[1]


def test_na_markers_in_the_mpp_column_give_none(mixed, model_file, tmp_path, capsys):
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("slide,label,mpp\nslides/stated.tif,1,NA\nslides/bare.tif,1,2\n")
    out = tmp_path / "out"
    code, _, err = run_cli_captured(["evaluate", manifest, "--out", out, "--model", model_file, "--bootstrap", "100",
                                     *FAST], capsys)
    assert code == 0, err
    assert _mpp(out, "stated")[1] not in ("fallback", "user") and _mpp(out, "bare") == (2.0, "user")


def test_a_fallback_replaces_an_objective_power_estimate_on_rerun(cohort, model_file, tmp_path, capsys):
    """A slide whose resolution was only estimated from its objective power (AppMag 40 -> 0.25 um/px) was kept
    "up to date" when a rerun gave --fallback-mpp, which a fresh run would have used instead."""
    folder = tmp_path / "s"
    folder.mkdir()
    desc = "Aperio Image Library v12.0.0\r\n1024x1024 (256x256) RGB|AppMag = 5|Filename = mag"
    tifffile.imwrite(folder / "mag.svs", tifffile.imread(cohort / "tumor_001.tif"), tile=(256, 256),
                     photometric="rgb", description=desc, metadata=None)
    out = tmp_path / "out"
    args = ["predict", folder, "--out", out, "--model", model_file, *FAST]
    code, _, err = run_cli_captured(args, capsys)
    assert code == 0 and "5x objective" in err and _mpp(out, "mag") == (2.0, "objective-power"), err
    state = json.loads(next((out / ".state").glob("mag.predict.json")).read_text())
    del state["result"]["mpp_source"], state["fallback_mpp"]  # as a state written before they were recorded
    next((out / ".state").glob("mag.predict.json")).write_text(json.dumps(state))
    code, text, err = run_cli_captured([*args, "--fallback-mpp", "1.5", "--verbose"], capsys)
    assert code == 0, err
    assert _mpp(out, "mag") == (1.5, "fallback")
    assert "read at a resolution estimated from its objective power; this run's --fallback-mpp is 1.5" in text + err


def test_a_slide_that_failed_otherwise_is_not_redone_for_a_new_fallback(mixed, model_file, tmp_path, capsys):
    """Only a failure for want of a resolution is tried again when the fallback changes: a broken file (or one
    that failed late in a long run) would fail, or cost, the same again; --retry-failed still tries it."""
    (mixed / "bare.tif").write_bytes((mixed / "bare.tif").read_bytes()[:3000])
    out = tmp_path / "out"
    args = ["predict", mixed, "--out", out, "--model", model_file, *FAST]
    assert run_cli_captured([*args, "--fallback-mpp", "2"], capsys)[0] == 3
    first = _started(out, "bare")
    code, _, err = run_cli_captured([*args, "--fallback-mpp", "1.5"], capsys)
    assert code == 3 and "failed in an earlier run" in err and _started(out, "bare") == first
    code, _, err = run_cli_captured([*args, "--fallback-mpp", "1.5", "--retry-failed"], capsys)
    assert code == 3 and _started(out, "bare") != first


def test_info_on_the_folder_survives_foreign_slide_names(tmp_path, capsys):
    state_dir = tmp_path / "out" / ".state"
    state_dir.mkdir(parents=True)
    for i, name in enumerate(["x" * 300, "../elsewhere", "/abs"]):
        (state_dir / f"s{i}.predict.json").write_text(json.dumps({"slide": name, "status": "failed",
                                                                  "error": "boom", "fallback_mpp": 10 ** 400}))
    code, text, err = run_cli_captured(["info", tmp_path / "out", "--json"], capsys)
    assert code == 0 and "Traceback" not in err
    assert [s["earlier_outputs"] for s in json.loads(text)["slides"]] == [False, False, False]


def test_a_scan_far_coarser_than_it_is_read_at_is_refused_before_it_runs(mixed, model_file, tmp_path, capsys):
    """--fallback-mpp 20 (typed for 0.20) planned an image 20x the slide's side and ran for hours before the
    domain note said "enlarged"; past 8x the slide is refused before any region is read, below it warned about.
    Corrected, the fallback runs the refused slide again (the error tells the user to check it)."""
    out = tmp_path / "out"
    base = ["predict", mixed / "bare.tif", "--out", out, "--model", model_file, "--device", "cpu",
            "--region-px", "512", "--overlap-px", "64", "--reader-threads", "1"]
    code, _, err = run_cli_captured([*base, "--fallback-mpp", "20", "--target-mpp", "1"], capsys)
    assert code == 1 and "bare.tif" in err and "enlarged 20x (20,480 x 20,480 px)" in err
    assert "check its resolution" in err and "Traceback" not in err
    code, _, err = run_cli_captured([*base, "--fallback-mpp", "20", "--target-mpp", "1"], capsys)
    assert code == 1 and "failed in an earlier run" in err  # the same fallback: a known failure
    code, _, err = run_cli_captured([*base, "--fallback-mpp", "2", "--target-mpp", "1"], capsys)
    assert code == 0 and "enlarged 2x" in err, err
    code, _, err = run_cli_captured([*base, "--fallback-mpp", "20", "--target-mpp", "4"], capsys)
    assert code == 0 and "enlarged 5x" in err and "out of domain" in err
    rec = json.loads((out / "bare" / "prediction.json").read_text())
    assert rec["in_domain"] is False and any("enlarged 5x" in n for n in rec["domain_notes"])


def test_info_flags_an_extract_slides_earlier_features_after_a_failed_redo(mixed, model_file, tmp_path, capsys):
    out = tmp_path / "feats"
    args = ["extract", mixed, "--out", out, "--model", model_file, "--fallback-mpp", "2", *FAST]
    assert run_cli_captured(args, capsys)[0] == 0
    (mixed / "bare.tif").write_bytes((mixed / "bare.tif").read_bytes()[:3000])  # changed and broken: redone, fails
    assert run_cli_captured(args, capsys)[0] == 3
    code, text, _ = run_cli_captured(["info", out, "--json"], capsys)
    entries = {s["slide"]: s for s in json.loads(text)["slides"]}
    assert entries["bare"]["status"] == "failed" and entries["bare"]["earlier_outputs"] is True
    assert (out / "bare.zarr").exists() and entries["stated"]["earlier_outputs"] is False


def test_a_decimal_comma_in_the_mpp_column_is_refused_with_a_hint(mixed, tmp_path):
    """`slides/bare.tif,1,0,25` split into four fields: the fourth was dropped and the slide read at 0 (refused)
    or, for `1,5`, silently at 1 um/px."""
    from wsi_vssm.runs.cohort import CohortError, read_manifest

    manifest = tmp_path / "cohort.csv"
    manifest.write_text("slide,label,mpp\nslides/stated.tif,1,\nslides/bare.tif,1,1,5\n")
    with pytest.raises(CohortError, match=r"line 3: 4 fields under a header of 3: a decimal comma"):
        read_manifest(manifest)
    manifest.write_text('slide,label,mpp\nslides/bare.tif,1,"0,25"\n')
    with pytest.raises(CohortError, match=r"a decimal comma\? write 0.25"):
        read_manifest(manifest)
    manifest.write_text("slide,label,note\nslides/bare.tif,1,a,b\n")  # no mpp column: extra fields as before
    assert read_manifest(manifest).rows[0].mpp is None


@pytest.mark.parametrize("column", ["mpp", "MPP", "mpp_um", "microns_per_pixel"])
def test_the_mpp_column_may_carry_other_tables_names(mixed, tmp_path, column):
    from wsi_vssm.runs.cohort import read_manifest

    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"slide,label,{column}\nslides/bare.tif,1,0.5\n")
    assert read_manifest(manifest).rows[0].mpp == 0.5


@pytest.mark.parametrize("sep, word", [(";", "semicolons"), ("\t", "tabs")])
def test_a_table_separated_otherwise_than_by_commas_says_so(tmp_path, sep, word):
    """A semicolon table (a spreadsheet's CSV in a decimal-comma locale) was told "expected 'name,label', got
    'slide;label;mpp'", the error of another layout."""
    from wsi_vssm.runs.cohort import CohortError, read_cohort

    table = tmp_path / "cohort.csv"
    table.write_text(sep.join(["slide", "label", "mpp"]) + "\n" + sep.join(["a.tif", "1", "0,25"]) + "\n")
    with pytest.raises(CohortError, match=f"line 1: the fields are separated by {word}"):
        read_cohort(table)


def test_a_resolution_column_under_another_name_is_warned_about(mixed, tmp_path):
    from wsi_vssm.runs.cohort import read_manifest

    manifest = tmp_path / "cohort.csv"
    manifest.write_text("slide,label,mpp (um/px)\nslides/bare.tif,1,0.5\n")
    with pytest.warns(UserWarning, match=r"column 'mpp \(um/px\)' is not read as the slides' resolution"):
        assert read_manifest(manifest).rows[0].mpp is None
    manifest.write_text("slide,label,mpp,mpp_x\nslides/bare.tif,1,0.5,0.5\n")
    with pytest.warns(UserWarning, match=r"'mpp_x' is not read .*'mpp' is\)"):
        assert read_manifest(manifest).rows[0].mpp == 0.5


def test_predict_and_extract_take_a_slide_list_csv_with_its_mpp_column(mixed, model_file, tmp_path, capsys):
    """A TRIDENT-style list (`wsi[,mpp]`, no labels): each row a slide, its mpp that slide's resolution; a row
    whose file is missing fails alone. Before, a CSV given to predict failed as "not a slide"."""
    listing = tmp_path / "list.csv"
    listing.write_text("wsi,mpp,note\nslides/stated.tif,,x\nslides/bare.tif,2.0,y\nslides/gone.tif,,z\n")
    out = tmp_path / "out"
    code, _, err = run_cli_captured(["predict", listing, "--out", out, "--model", model_file, *FAST], capsys)
    assert code == 3 and "gone.tif" in err, err  # the missing slide fails alone; the others are done
    assert _mpp(out, "bare") == (2.0, "user") and _mpp(out, "stated")[1] not in ("fallback", "user")
    assert read_state(out, "predict", "bare")["params"]["slide_mpp"] == 2.0
    code, _, err = run_cli_captured(["extract", listing, "--out", tmp_path / "feat", "--model", model_file, *FAST],
                                    capsys)
    assert code == 3 and (tmp_path / "feat" / "bare.zarr").is_dir(), err


def test_a_slide_list_without_a_path_column_or_rows_is_one_line(model_file, tmp_path, capsys):
    from wsi_vssm.runs.slide_args import read_slide_list

    bad = tmp_path / "bad.csv"
    bad.write_text("name,label\na.tif,1\n")
    assert_one_line_error(["predict", bad, "--model", model_file, "--out", tmp_path / "o"], capsys, 1,
                          "bad.csv: a slide list needs a header naming its path column", "its header has: name, label")
    bad.write_text("slide\n")
    assert_one_line_error(["predict", bad, "--model", model_file, "--out", tmp_path / "o"], capsys, 1,
                          "bad.csv: the slide list names no slides")
    with pytest.MonkeyPatch.context() as mp:  # extract refuses it before its model loads (it loaded it first)
        import wsi_vssm.models.model_file as model_file_module

        mp.setattr(model_file_module, "load_backbone", lambda *a, **k: pytest.fail("the model was loaded"))
        assert_one_line_error(["extract", bad, "--model", model_file, "--out", tmp_path / "f"], capsys, 1,
                              "bad.csv: the slide list names no slides")
    bad.write_text("slide,mpp\na.tif,0,25\n")
    assert_one_line_error(["predict", bad, "--model", model_file, "--out", tmp_path / "o"], capsys, 1,
                          "bad.csv, line 2")
    bad.write_text("path\n/abs/a.tif\nsub/b.svs\n")
    assert read_slide_list(bad) == [("/abs/a.tif", None), (str(tmp_path / "sub" / "b.svs"), None)]


def test_a_slide_list_row_that_restates_or_contradicts_a_resolution(mixed, model_file, tmp_path, capsys):
    """A list naming one file twice with different mpp values kept the first row with only the "given twice"
    note; and an mpp column filled from the files (the stated value again) warned of an override per slide."""
    listing = tmp_path / "list.csv"
    listing.write_text("wsi,mpp\nslides/bare.tif,2.0\nslides/bare.tif,2.5\nslides/stated.tif,2.0\n")
    code, _, err = run_cli_captured(["predict", listing, "--out", tmp_path / "out", "--model", model_file, *FAST],
                                    capsys)
    assert code == 0, err
    said = [line for line in err.splitlines() if "given twice" in line]
    assert len(said) == 1 and "warning" in said[0] and "different mpp (2 um/px and 2.5 um/px)" in said[0], err
    assert "with the first: 2 um/px" in said[0] and _mpp(tmp_path / "out", "bare") == (2.0, "user")
    assert "using the given" not in err  # stated.tif states 2 um/px itself
