"""`evaluate --subgroup COLUMN` (the column by name or number, refused columns, the report it adds) and
`evaluate --vector` (vector copies of the report figures)."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import assert_one_line_error, run_cli_captured, write_patch_folder

from wsi_vssm.errors import UsageError
from wsi_vssm.runs.cohort import read_cohort
from wsi_vssm.runs.subgroups import column_values, subgroup_columns

FAST = ["--device", "cpu", "--reader-threads", "1", "--bootstrap", "200"]


def _table(tmp_path, text: str):
    (tmp_path / "t.csv").write_text(text)
    return read_cohort(tmp_path / "t.csv", find_slides=False)


def test_a_header_name_in_any_case_or_a_number_names_one_column(tmp_path):
    c = _table(tmp_path, "slide,label,Centre,scanner\na.tif,1,RUMC,x\nb.tif,0,UMCU\n")
    assert column_values(c, "centre") == ("Centre", {"a": "RUMC", "b": "UMCU"})
    assert column_values(c, "3") == ("Centre", {"a": "RUMC", "b": "UMCU"})
    assert column_values(c, "scanner") == ("scanner", {"a": "x", "b": ""})  # a short row has no value
    assert list(subgroup_columns(c, ["Centre", "3", "4"])) == ["Centre", "scanner"]  # one column once


def test_camelyon16s_headerless_reference_takes_numbers(tmp_path):
    c = _table(tmp_path, "Test_001,Tumor,Macro,,\nTest_002,Normal,,,\ntest_003,tumor,Micro,,\n")
    name, values = column_values(c, "3")
    assert name == "column 3" and values == {"Test_001": "Macro", "Test_002": "", "test_003": "Micro"}
    with pytest.raises(UsageError, match=r"no header row and 5 column\(s\): give a column's number"):
        column_values(c, "type")


@pytest.mark.parametrize("spec", ["label", "slide", "split", "1", "2"])
def test_columns_that_name_label_or_split_the_slides_are_refused(tmp_path, spec):
    c = _table(tmp_path, "slide,label,split,centre\na.tif,1,test,A\n")
    with pytest.raises(UsageError, match="names, labels or splits the slides"):
        column_values(c, spec)
    headerless = _table(tmp_path, "a,Tumor,Macro\n")
    with pytest.raises(UsageError, match="names, labels or splits"):
        column_values(headerless, "2")


def test_the_columns_the_table_was_read_by_are_refused_whatever_their_names(tmp_path):
    """The review's cases: `image,class,centre` read `class` as the labels and `image` as the names, yet
    `--subgroup 2` and a name column outside the list were taken as groupings."""
    c = _table(tmp_path, "case,class,centre\na,tumor,A\nb,normal,B\n")  # a headed reference: by name
    assert c.key_columns == (0, 1)
    for spec in ("1", "2", "case", "class"):
        with pytest.raises(UsageError, match="names, labels or splits the slides"):
            column_values(c, spec)
    assert column_values(c, "centre")[0] == "centre"
    (tmp_path / "a.tif").write_bytes(b"")  # a file beside the table: read as a manifest of paths
    manifest = _table(tmp_path, "path,label,um_per_px,site\na.tif,1,0.5,X\n")
    assert manifest.key_columns == (0, 1, 2)  # um_per_px is read as the mpp: no grouping
    with pytest.raises(UsageError, match="names, labels or splits"):
        column_values(manifest, "um_per_px")


def test_a_column_the_table_lacks_names_the_ones_it_has(tmp_path):
    c = _table(tmp_path, "slide,label,centre\na.tif,1,A\n")
    for spec in ("center", "9", "0"):
        with pytest.raises(UsageError, match=r"t\.csv: no column .* for --subgroup; its columns: slide, label, centre"):
            column_values(c, spec)


def _manifest(cohort, tmp_path, centres: dict[str, str]):
    rows = "".join(f"{cohort / (n + '.tif')},{1 if n.startswith('tumor') else 0},{c}\n" for n, c in centres.items())
    path = tmp_path / "m.csv"
    path.write_text("slide,label,centre\n" + rows)
    return path


def test_evaluate_reports_each_group_and_a_rerun_without_it_takes_the_figure_away(cohort, model_file, tmp_path,
                                                                                  capsys):
    table = _manifest(cohort, tmp_path, {"normal_001": "A", "tumor_001": "A", "normal_002": "B"})
    out = tmp_path / "ev"
    code, stdout, err = run_cli_captured(["evaluate", table, "--model", model_file, "--out", out,
                                          "--subgroup", "Centre", *FAST], capsys)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["average_precision"] is not None and set(m["sensitivity_at_specificity"]) == {"0.90", "0.95", "0.99"}
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    called = [int(r["label"]) for r in rows if float(r["probability"]) >= m["threshold"]]
    assert m["ppv"] == (sum(called) / len(called) if called else None)  # the tumour share of the slides called
    block = m["subgroups"]["centre"]
    assert block["negatives"] == "within group" and block["heterogeneity"] is None  # one group has an AUC
    a, b = block["groups"]
    assert (a["value"], a["n_tumour"], a["n_normal"]) == ("A", 1, 1) and a["auc"] is not None
    assert (b["value"], b["n_tumour"], b["n_normal"], b["auc"]) == ("B", 0, 1, None)
    assert (out / "roc_subgroups.png").read_bytes()[:4] == b"\x89PNG"
    assert "subgroups by centre: A AUC" in stdout and "B AUC n/a (0 tumour, 1 normal)" in stdout
    code, info, _ = run_cli_captured(["info", out], capsys)
    assert code == 0 and "  subgroups by centre: A AUC" in info.splitlines()[2], info  # under the report line
    code, stdout, err = run_cli_captured(["evaluate", table, "--model", model_file, "--out", out, *FAST], capsys)
    assert code == 0, err
    assert "subgroups" not in json.loads((out / "metrics.json").read_text())
    assert not (out / "roc_subgroups.png").exists() and "subgroups by" not in stdout


def test_a_bad_subgroup_column_fails_before_any_slide_runs(cohort, model_file, tmp_path, capsys):
    table = _manifest(cohort, tmp_path, {"normal_001": "A", "tumor_001": "B"})
    out = tmp_path / "ev"
    assert_one_line_error(["evaluate", table, "--model", model_file, "--out", out, "--subgroup", "site", *FAST],
                          capsys, 2, "m.csv: no column 'site' for --subgroup; its columns: slide, label, centre")
    assert not (out / ".state").exists()


def test_a_patch_folder_refuses_subgroups(model_file, tmp_path, capsys):
    write_patch_folder(tmp_path / "p", 2, seed=0)
    assert_one_line_error(["evaluate", tmp_path / "p", "--mpp", "0.97", "--model", model_file, "--out",
                           tmp_path / "o", "--subgroup", "3"], capsys, 2, "--subgroup", "patch by patch")


def test_vector_copies_of_every_figure_same_bytes_on_a_rerun_and_gone_without_the_option(cohort, model_file,
                                                                                           tmp_path, capsys):
    table = _manifest(cohort, tmp_path, {"normal_001": "A", "tumor_001": "A", "normal_002": "B"})
    out = tmp_path / "ev"
    args = ["evaluate", table, "--model", model_file, "--out", out, "--subgroup", "centre", *FAST]
    code, _, err = run_cli_captured([*args, "--vector", "pdf", "--vector", "svg"], capsys)
    assert code == 0, err
    figures = ("roc", "calibration", "roc_subgroups")
    first = {f"{f}.{x}": (out / f"{f}.{x}").read_bytes() for f in figures for x in ("pdf", "svg")}
    assert all(first[f"{f}.pdf"].startswith(b"%PDF") and b"<svg" in first[f"{f}.svg"] for f in figures)
    code, _, err = run_cli_captured([*args, "--vector", "pdf", "--vector", "svg"], capsys)
    assert code == 0 and first == {name: (out / name).read_bytes() for name in first}  # no dates, fixed ids
    code, _, err = run_cli_captured(args, capsys)
    assert code == 0 and not any((out / name).exists() for name in first), sorted(p.name for p in out.iterdir())
    assert all((out / f"{f}.png").is_file() for f in figures)


def test_slide_names_of_the_vector_figures_are_refused(cohort, model_file, tmp_path, capsys):
    """A slide `roc.pdf.tif` would make OUT/roc.pdf its folder, where `evaluate --vector pdf` writes a figure."""
    import shutil

    (tmp_path / "in").mkdir()
    shutil.copy(cohort / "normal_001.tif", tmp_path / "in" / "roc.pdf.tif")
    code, _, err = run_cli_captured(["predict", tmp_path / "in" / "roc.pdf.tif", "--model", model_file, "--out",
                                     tmp_path / "o", "--device", "cpu"], capsys)
    assert code == 1 and "is that of a file or folder the run keeps in" in err, err


def test_vector_copies_another_run_left_are_removed_by_the_report(tmp_path):
    """The review's case: a run with --vector pdf finished while one without it worked; the later report kept the
    earlier run's roc.pdf over other slides. The report removes every copy it did not write itself."""
    from wsi_vssm.atomic import VECTOR_FORMATS, vector_copies
    from wsi_vssm.outputs.files import REPORT_FIGURES, vector_copies_of
    from wsi_vssm.runs.evaluate import _drop_other_vector_copies

    assert all(tuple(c.rsplit(".", 1)[1] for c in vector_copies_of(f)) == VECTOR_FORMATS for f in REPORT_FIGURES)
    names = [c for f in REPORT_FIGURES for c in vector_copies_of(f)]
    for name in names:
        (tmp_path / name).write_text("another run's")
    with vector_copies(["pdf"]):
        _drop_other_vector_copies(tmp_path, {"roc.png", "calibration.png"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.pdf", "roc.pdf"]  # this run writes these
    _drop_other_vector_copies(tmp_path, {"roc.png", "calibration.png"})  # a run without --vector
    assert not list(tmp_path.iterdir())
