"""Cohort tables: manifests, CAMELYON16-style reference.csv in its real shapes, and their errors."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from wsi_vssm.runs.cohort import CohortError, index_slides, read_cohort, read_manifest, read_reference, slide_name


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_manifest_paths_relative_to_csv_with_split_and_extra_columns(tmp_path):
    _touch(tmp_path / "slides" / "a.svs")
    _touch(tmp_path / "slides" / "b.ome.tiff")
    csv = tmp_path / "lists" / "m.csv"
    csv.parent.mkdir()
    csv.write_text("slide,label,split,site\n../slides/a.svs,Tumour,train,x\n../slides/b.ome.tiff,0,VALID,y\n")
    c = read_cohort(csv)
    assert c.layout == "manifest" and c.has_split
    assert [(r.name, r.label, r.split) for r in c.rows] == [("a", 1, "train"), ("b", 0, "valid")]
    assert c.rows[0].path == csv.parent / "../slides/a.svs" and all(r.ok for r in c.rows)


@pytest.mark.parametrize("column", ["path", "file", "wsi"])
def test_a_table_of_slide_paths_under_another_column_name_is_a_manifest(tmp_path, column):
    """`path,label` was read as a CAMELYON16 reference table: the folders were dropped, every name looked up under
    the table's folder, and each row failed with "no slide file named ..." (or took a same-named file elsewhere)."""
    a = _touch(tmp_path / "slides" / "a.svs")
    _touch(tmp_path / "lists" / "elsewhere" / "a.svs")  # a same-named file the lookup by name would have found
    csv = tmp_path / "lists" / "m.csv"
    csv.write_text(f"{column},label\n{a},1\n")
    c = read_cohort(csv)
    assert c.layout == "manifest" and [(r.name, r.path, r.label) for r in c.rows] == [("a", a, 1)]


def test_a_path_in_a_table_of_names_is_refused_not_looked_up_by_its_name(tmp_path):
    _touch(tmp_path / "x" / "tumor_001.tif")
    ref = tmp_path / "reference.csv"
    ref.write_text("/data/cohort/tumor_001.tif,Tumor\n")
    with pytest.raises(CohortError, match=r"line 1: '/data/cohort/tumor_001.tif' is a path.*'slide,label'"):
        read_cohort(ref)
    (tmp_path / "m.csv").write_text("slide,y\na.svs,1\n")  # a slide column without a label column
    with pytest.raises(CohortError, match="needs 'slide' and 'label' columns; its header has: slide, y"):
        read_cohort(tmp_path / "m.csv")


def test_tables_read_before_the_new_column_names_still_read_the_same(tmp_path):
    """Review of the change: a manifest of files with extensions the suffix list lacks became a name table;
    `file,class` and `path,diagnosis` name tables were refused; a names table with its slide column second read
    its header as data."""
    a, b = _touch(tmp_path / "a.qptiff"), _touch(tmp_path / "b.btf")
    (tmp_path / "m.csv").write_text("slide,label\na.qptiff,1\nb.btf,0\n")
    assert [r.path for r in read_cohort(tmp_path / "m.csv").rows] == [a, b]
    _touch(tmp_path / "x" / "tumor_001.tif")
    for header in ("file,class", "path,diagnosis"):
        (tmp_path / "r.csv").write_text(f"{header}\ntumor_001,tumor\n")
        assert [(r.name, r.label, r.ok) for r in read_cohort(tmp_path / "r.csv").rows] == [("tumor_001", 1, True)]
    (tmp_path / "l.csv").write_text("label,slide\n1,tumor_001\n")
    assert [(r.name, r.label, r.ok) for r in read_cohort(tmp_path / "l.csv").rows] == [("tumor_001", 1, True)]


def test_manifest_missing_file_is_a_failed_row(tmp_path):
    _touch(tmp_path / "a.tif")
    csv = tmp_path / "m.csv"
    csv.write_text("slide,label\na.tif,1\ngone.tif,0\n")
    c = read_manifest(csv)
    assert [r.name for r in c.ok] == ["a"]
    assert [r.name for r in c.failed] == ["gone"] and "gone.tif" in c.failed[0].error
    assert c.failed[0].line == 3
    # a row that gives a slide's name without its extension: the table and line, and the file that is there
    _touch(tmp_path / "bare.svs")
    (tmp_path / "n.csv").write_text("slide,label\nbare,1\n")
    error = read_manifest(tmp_path / "n.csv").failed[0].error
    assert error == f"slide file not found: {tmp_path / 'bare'} ({tmp_path / 'n.csv'}, line 2); bare.svs is there: " \
                    "give the file's whole name", error
    # labels only (cached features): nothing is looked up, nothing fails
    assert not read_manifest(csv, find_slides=False).failed


@pytest.mark.parametrize("ref", [".", "./", "/", ".."])
def test_a_manifest_row_naming_a_folder_fails_before_any_slide_runs(tmp_path, ref):
    """`./` once stopped a whole evaluate after its first slide (an output name of ''), losing the rest."""
    _touch(tmp_path / "a.tif")
    csv = tmp_path / "m.csv"
    csv.write_text(f"slide,label\na.tif,1\n{ref},0\n")
    with pytest.raises(CohortError, match=rf"m\.csv, line 3: '{re.escape(ref)}' names a folder, not a slide file"):
        read_manifest(csv)


@pytest.mark.parametrize("ref", [".", ".."])
def test_a_table_of_names_with_a_folder_row_fails_before_any_slide_runs(tmp_path, ref):
    """A `slide,label` table of names with a `.` row ran into "predictions row 0 needs a slide name" after "no
    slide file named ''", exit 1, no slide run; a manifest of paths said it in one line before any slide ran."""
    from wsi_vssm.runs.cohort import read_cohort

    for name in ("normal_001", "tumor_001"):
        _touch(tmp_path / f"{name}.tif")
    csv = tmp_path / "t.csv"
    csv.write_text(f"slide,label\n{ref},normal\nnormal_001,normal\ntumor_001,tumor\n")
    with pytest.raises(CohortError, match=rf"t\.csv, line 2: '{re.escape(ref)}' names a folder, not a slide$"):
        read_cohort(csv)


def test_predict_of_a_folder_path_fails_alone_and_writes_no_state(model_file, cohort, tmp_path, capsys):
    from conftest import run_cli_captured

    out = tmp_path / "o"
    code, stdout, err = run_cli_captured(["predict", ".", cohort / "normal_001.tif", "--out", out, "--model",
                                          model_file, "--target-mpp", "4", "--region-px", "512"], capsys)
    assert code == 3 and "Traceback" not in err and ".: a folder with no slide files directly in it" in err
    assert "normal_001: probability" in stdout
    assert sorted(p.name for p in (out / ".state").glob("*.json")) == ["normal_001.predict.json"]


def test_folders_that_hold_no_slide_say_why(model_file, tmp_path, capsys):
    """A GDC download (one slide per sub-folder) and a prediction folder were each reported as "a directory, but
    not an OME-Zarr store"; a prediction folder's heatmap.ome.zarr was even read as a slide, and asked for --mpp."""
    import numpy as np
    from conftest import run_cli_captured

    from wsi_vssm.outputs.heatmap import write_heatmap_zarr

    (tmp_path / "gdc" / "0b1c").mkdir(parents=True)
    (tmp_path / "gdc" / "0b1c" / "TCGA-XX.svs").write_bytes(b"not read")
    pred = tmp_path / "out" / "s1"
    heatmap = write_heatmap_zarr(pred / "heatmap.ome.zarr", np.zeros((4, 4), np.float32), cell0=64.0,
                                 origin=(0, 0), slide_mpp=0.5, attrs={"slide": "s1"})
    (pred / "prediction.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli_captured(["predict", tmp_path / "gdc", pred, heatmap, empty, "--out", tmp_path / "o",
                                     "--model", model_file], capsys)
    lines = err.strip().splitlines()
    assert code == 3 and "Traceback" not in err and len(lines) == 5, err
    assert any(f"{tmp_path / 'gdc'}: a folder with no slide files directly in it" in x
               and f"'{tmp_path / 'gdc' / '*' / '*.svs'}'" in x for x in lines), err
    assert any(f"{pred}: a wsi-vssm prediction folder (an output of predict), not a slide" in x for x in lines), err
    assert any(f"{heatmap}: a wsi-vssm heatmap (an output of predict), not a slide" in x for x in lines), err
    assert any(f"{empty}: an empty folder, not a slide" in x for x in lines), err


def test_feature_files_given_as_slides_say_what_they_are(model_file, cohort, tmp_path, capsys):
    """`predict FEATURES_DIR` (extract's --out) took each <slide>.zarr for an OME-Zarr slide and failed it as "zarr
    store without OME-NGFF multiscales"; a folder of slides with an extract output beside them did the same."""
    import shutil

    import numpy as np
    from conftest import run_cli_captured

    from wsi_vssm.pipeline.store import STORE_FORMAT, CellFeatures, FeatureStore

    def store(path):
        xy = np.zeros((1, 2), np.int64)
        return FeatureStore.write(path, CellFeatures(np.zeros((1, 4), np.float16), xy, xy.astype(np.float32),
                                                     np.zeros(1, np.int32), np.ones(1, np.float16),
                                                     {"format": STORE_FORMAT, "slide": path.stem})).path

    feats = tmp_path / "feats"
    one = store(feats / "s1.zarr")
    (feats / "h5_files").mkdir()
    h5_only = tmp_path / "h5only"
    (h5_only / "h5_files").mkdir(parents=True)
    slides = tmp_path / "slides"  # one slide and, beside it, a store that extract wrote there
    slides.mkdir()
    shutil.copy(cohort / "normal_001.tif", slides)
    store(slides / "normal_002.zarr")
    code, stdout, err = run_cli_captured(["predict", feats, one, h5_only, slides, "--out", tmp_path / "o", "--model",
                                          model_file, "--target-mpp", "4", "--region-px", "512"], capsys)
    lines = err.strip().splitlines()
    assert code == 3 and "Traceback" not in err and "multiscales" not in err, err
    assert any(f"{feats}: a folder of wsi-vssm feature files (an output of extract)" in x for x in lines), err
    assert any(f"{h5_only}: a folder of wsi-vssm feature files" in x for x in lines), err
    assert any(f"{one}: a wsi-vssm feature store (an output of extract), not a slide" in x for x in lines), err
    assert "normal_001: probability" in stdout and "normal_002" not in stdout + err


@pytest.mark.parametrize(
    "text",
    [
        "Test_001,Tumor,Macro,,\nTest_002,Normal,,,\ntest_003,tumor,Micro,,\n",  # official: no header, extras
        "image,type\nTest_001,TUMOR\nTest_002,normal\ntest_003,1\n",  # a header row
        "\ufeffTest_001,Tumor\r\nTest_002,0\r\n\r\ntest_003,Tumor\r\n",  # BOM, CRLF, blank line
    ],
)
def test_camelyon_folder_finds_slides_anywhere_any_case_any_extension(tmp_path, text):
    _touch(tmp_path / "images" / "test_001.tif")
    _touch(tmp_path / "deep" / "er" / "TEST_002.svs")
    _touch(tmp_path / "test_003.ome.tiff")
    _touch(tmp_path / "annotations" / "test_001.xml")  # not a slide: ignored
    (tmp_path / "reference.csv").write_text(text, encoding="utf-8")
    c = read_cohort(tmp_path)
    assert c.layout == "camelyon"
    assert [(r.name, r.label) for r in c.rows] == [("Test_001", 1), ("Test_002", 0), ("test_003", 1)]
    assert [r.path.name for r in c.rows] == ["test_001.tif", "TEST_002.svs", "test_003.ome.tiff"]
    assert c.labels() == {"Test_001": 1, "Test_002": 0, "test_003": 1}


def test_reference_csv_path_reads_camelyon_layout(tmp_path):
    _touch(tmp_path / "tumor_001.tif")
    ref = tmp_path / "reference.csv"
    ref.write_text("tumor_001,Tumor\nnormal_001,Normal\n")
    c = read_cohort(ref)
    assert [r.name for r in c.ok] == ["tumor_001"]
    assert [r.name for r in c.failed] == ["normal_001"] and "no slide file" in c.failed[0].error


def test_bad_label_names_file_and_row(tmp_path):
    ref = tmp_path / "reference.csv"
    ref.write_text("tumor_001,Tumor\ntumor_002,maybe\n")
    with pytest.raises(CohortError, match=r"reference\.csv, line 2: label 'maybe'"):
        read_reference(ref)
    man = tmp_path / "m.csv"
    man.write_text("slide,label\na.tif,2\n")
    with pytest.raises(CohortError, match=r"m\.csv, line 2: label '2'") as err:
        read_cohort(man)
    assert "\n" not in str(err.value)


def test_bad_split_and_duplicates_are_errors(tmp_path):
    man = tmp_path / "m.csv"
    man.write_text("slide,label,split\na.tif,1,holdout\n")
    with pytest.raises(CohortError, match="line 2: split 'holdout'"):
        read_manifest(man, find_slides=False)
    ref = tmp_path / "reference.csv"
    ref.write_text("Tumor_001,Tumor\nnormal_001,normal\ntumor_001,tumor\n")
    with pytest.raises(CohortError, match=r"line 3: slide 'tumor_001' is listed again \(first on line 1\)"):
        read_reference(ref, find_slides=False)


def test_an_ambiguous_slide_name_is_refused_before_any_slide_runs(tmp_path):
    """It failed at run time (exit 3, the metrics leaving the slide out), while a repeated manifest row was refused
    up front: an unattended run learnt of it only at the end."""
    _touch(tmp_path / "a" / "s1.tif")
    _touch(tmp_path / "b" / "s1.svs")
    (tmp_path / "reference.csv").write_text("s1,normal\n")
    with pytest.raises(CohortError, match=r"line 1: several slide files named 's1' under .*a/s1.tif"):
        read_cohort(tmp_path)


def test_names_match_in_either_unicode_form(tmp_path):
    """macOS writes file names decomposed (NFD); a typed table is composed (NFC): `tümör` looked identical in
    `ls` and was "not found", by name and by path."""
    import unicodedata

    nfd, nfc = unicodedata.normalize("NFD", "tümör"), unicodedata.normalize("NFC", "tümör")
    assert nfd != nfc
    _touch(tmp_path / "slides" / f"{nfd}.tif")
    (tmp_path / "slides" / "reference.csv").write_text(f"{nfc},tumor\n")
    (row,) = read_cohort(tmp_path / "slides" / "reference.csv").rows
    assert row.ok and row.path.name == f"{nfd}.tif"
    (tmp_path / "m.csv").write_text(f"slide,label\nslides/{nfc}.tif,1\n")
    (row,) = read_cohort(tmp_path / "m.csv").rows
    assert row.ok and row.path.exists()


def test_manifest_slides_differing_only_in_case_are_told_apart_from_a_repeated_row(tmp_path):
    """`c/Case.tif` and `c/case.tif` (two files on Linux, one output folder on macOS) read as a repeated row."""
    _touch(tmp_path / "c" / "Case.tif")
    _touch(tmp_path / "c" / "case.tif")
    (tmp_path / "m.csv").write_text("slide,label\nc/Case.tif,1\nc/case.tif,0\n")
    with pytest.raises(CohortError, match=r"line 3: slides 'case' and 'Case' \(line 2\) differ only in case"):
        read_cohort(tmp_path / "m.csv")


def test_missing_reference_and_names(tmp_path):
    with pytest.raises(CohortError, match="needs a reference.csv"):
        read_cohort(tmp_path)
    with pytest.raises(CohortError, match="no such cohort"):
        read_cohort(tmp_path / "nope.csv")
    assert slide_name("x/a.ome.tiff") == "a" and slide_name("b.SVS") == "b" and slide_name("c.v2.tif") == "c.v2"
    from wsi_vssm.io import SlideReader
    from wsi_vssm.runs.runner import slide_key

    for p in ("x/a.ome.tiff", "b.SVS", "c.v2.tif", "D.OME.ZARR", "e"):  # one rule: outputs, runner, cohorts
        reader_name = SlideReader.name.fget(SimpleNamespace(path=Path(p)))  # what a file reader calls the slide
        assert slide_name(p) == slide_key(p) == reader_name
    (tmp_path / "feat.zarr").mkdir()
    _touch(tmp_path / "feat.zarr" / "x.tif")  # inside a zarr store: never a slide
    _touch(tmp_path / ".hidden" / "y.tif")
    assert index_slides(tmp_path) == {}


@pytest.mark.parametrize("utf8_mode", ["1", "0"])
def test_a_utf8_slide_name_under_an_ascii_locale_still_names_its_outputs(tmp_path, utf8_mode):
    """`LC_ALL=C PYTHONUTF8=0 wsi-vssm predict lymfeknude_æøå.tif` died with UnicodeEncodeError: the name's
    UTF-8 letters, decoded back to text, cannot be a file name under an ASCII file system encoding."""
    import os
    import subprocess
    import sys

    code = ("import os, sys\nfrom wsi_vssm.io.base import slide_name\n"
            "n = slide_name(os.fsdecode(b'dir/lymfeknude_\\xc3\\xa6\\xe6\\xb7\\x8b.tif'))\n"
            "os.fsencode(n)\nprint(sys.getfilesystemencoding(), ascii(n))\n")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": utf8_mode}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    encoding, name = res.stdout.split()
    if encoding == "utf-8":
        assert name == ascii("lymfeknude_\u00e6\u6dcb")  # the letters themselves
    else:
        assert name == ascii("lymfeknude_\\xc3\\xa6\\xe6\\xb7\\x8b")  # spelt as the bytes on disk


def test_select_split_takes_the_test_rows_of_a_split_table_by_default(tmp_path):
    from wsi_vssm.errors import UsageError
    from wsi_vssm.runs.cohort import select_split

    for name in ("a", "b", "c"):
        _touch(tmp_path / f"{name}.tif")
    (tmp_path / "m.csv").write_text("slide,label,split\na.tif,1,train\nb.tif,0,test\nc.tif,1,test\n")
    cohort = read_manifest(tmp_path / "m.csv")
    chosen, split, note = select_split(cohort)
    assert split == "test" and [r.name for r in chosen.rows] == ["b", "c"] and "2 test slide(s) of 3" in note
    assert select_split(cohort, "all")[0] is cohort and select_split(cohort, "all")[2] is None
    with pytest.raises(UsageError, match="has split 'valid'"):
        select_split(cohort, "valid")
    (tmp_path / "plain.csv").write_text("slide,label\na.tif,1\n")
    plain = read_manifest(tmp_path / "plain.csv")
    assert select_split(plain)[1:] == ("all", None)
    with pytest.raises(UsageError, match="has no split column to take the test rows from"):
        select_split(plain, "test")


def test_a_slide_label_table_of_names_is_looked_up_by_name(tmp_path):
    """`evaluate syn/reference.csv` (the file `synth` writes, header `slide,label`, names without extension) was
    read as a manifest of paths: every slide "not found"; `evaluate syn` (its folder) worked."""
    _touch(tmp_path / "slides" / "tumor_001.tif")
    _touch(tmp_path / "normal_001.svs")
    ref = tmp_path / "reference.csv"
    ref.write_text("slide,label\ntumor_001,tumor\nnormal_001,normal\n")
    c = read_cohort(ref)
    assert c.layout == "camelyon" and all(r.ok for r in c.rows)
    assert [r.path for r in c.rows] == [tmp_path / "slides" / "tumor_001.tif", tmp_path / "normal_001.svs"]
    (tmp_path / "m.csv").write_text("slide,label\nslides/tumor_001.tif,1\nnormal_001,0\n")  # any path: a manifest
    assert read_cohort(tmp_path / "m.csv").layout == "manifest"
    (tmp_path / "s.csv").write_text("slide,split,label\ntumor_001,train,1\nnormal_001,TEST,0\n")  # names + split
    c = read_cohort(tmp_path / "s.csv")
    assert [(r.name, r.label, r.split) for r in c.rows] == [("tumor_001", 1, "train"), ("normal_001", 0, "test")]


def test_a_cohort_folder_whose_reference_csv_is_a_manifest_reads_it_as_one(tmp_path):
    """`evaluate c2` with c2/reference.csv `path,label` said "... is a path, give a manifest", though it was one
    (`evaluate c2/reference.csv` worked)."""
    _touch(tmp_path / "sub" / "normal_001.tif")
    (tmp_path / "reference.csv").write_text("path,label\nsub/normal_001.tif,0\n")
    c = read_cohort(tmp_path)
    assert c.layout == "manifest" and [r.path for r in c.rows] == [tmp_path / "sub" / "normal_001.tif"]


def test_a_utf8_path_in_a_manifest_is_found_under_an_ascii_locale(tmp_path):
    """Under LC_ALL=C PYTHONUTF8=0 a manifest row `u/tümor_é.tif` was "slide file not found" (the same file given
    on the command line ran)."""
    import os
    import subprocess
    import sys

    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "t\u00fcmor_\u00e9.tif").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("slide,label\nu/t\u00fcmor_\u00e9.tif,1\n", encoding="utf-8")
    code = ("import sys\nfrom wsi_vssm.runs.cohort import read_manifest\n"
            f"r = read_manifest({str(tmp_path / 'm.csv')!r}).rows[0]\nprint(r.ok, ascii(r.name), r.error)\n")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("True "), res.stdout + res.stderr


def test_a_one_class_patch_folder_and_a_tar_are_named_for_what_they_are(tmp_path):
    """`evaluate` on a patch folder with only 0/ said "a cohort folder needs a reference.csv", and on PCam's
    train.tar "cannot read the table: 'utf-8' codec can't decode byte 0xff ..."."""
    import io
    import tarfile

    (tmp_path / "p" / "0").mkdir(parents=True)
    with pytest.raises(CohortError, match=r"needs both class folders 0/ and 1/ \(only 0/ here\)"):
        read_cohort(tmp_path / "p")
    with tarfile.open(tmp_path / "train.tar", "w") as tar:
        data = bytes(range(256)) * 4
        info = tarfile.TarInfo("data/train/0/a.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CohortError, match="a tar archive, not a cohort table.*extract it first"):
        read_cohort(tmp_path / "train.tar")
    # a data set's root (train/ and valid/, each with 0/ and 1/) and a class folder were sent to a reference.csv
    for part in ("train", "valid"):
        for c in "01":
            (tmp_path / "ds" / part / c).mkdir(parents=True)
    with pytest.raises(CohortError, match=r"give a folder with 0/ and 1/ directly below it: train/, valid/ here hold "
                                          r"them \(e.g. .*ds/train\)"):
        read_cohort(tmp_path / "ds")
    with pytest.raises(CohortError, match=r"0/ is a class folder: for its patches, give the folder above it, "
                                          r".*ds/valid"):
        read_cohort(tmp_path / "ds" / "valid" / "0")
    with pytest.raises(CohortError, match=r"needs a reference.csv \(or pass a manifest CSV\)$"):  # no patches: no hint
        read_cohort(tmp_path / "p" / "0")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CohortError, match=r"bin\.csv: cannot read the table: not UTF-8 text"):
        read_cohort(tmp_path / "bin.csv")


def test_a_name_table_stays_one_when_folders_of_its_names_lie_beside_it(tmp_path):
    """`evaluate COHORT --out COHORT` writes a folder per slide beside reference.csv; the rerun then took the
    table for a manifest of paths (a folder `tumor_001` "exists") and failed every slide as "a prediction folder,
    not a slide". A CLAM patch folder per slide did the same."""
    for name in ("tumor_001", "normal_001"):
        _touch(tmp_path / f"{name}.tif")
        (tmp_path / name).mkdir()  # predict's output folder, or a patch folder, named like the slide
    (tmp_path / "tumor_001" / "prediction.json").write_text("{}")
    (tmp_path / "reference.csv").write_text("slide,label\ntumor_001,tumor\nnormal_001,normal\n")
    c = read_cohort(tmp_path)
    assert c.layout == "camelyon" and all(r.ok for r in c.rows)
    assert [r.path for r in c.rows] == [tmp_path / "tumor_001.tif", tmp_path / "normal_001.tif"]


def test_clams_dataset_csv_and_its_labels_are_read(tmp_path):
    """CLAM's `case_id,slide_id,label` table was refused: its header was read as a data row ("label 'slide_id'
    is not one of 0, 1, ..."); its example labels and pandas' 1.0 were refused too."""
    for name in ("s1", "s2", "s3"):
        _touch(tmp_path / "slides" / f"{name}.svs")
    csv = tmp_path / "slides" / "tumor_vs_normal.csv"
    csv.write_text("case_id,slide_id,label\npatient_0,s1,tumor_tissue\npatient_0,s2,normal_tissue\n"
                   "patient_1,s3,1.0\n")
    c = read_cohort(csv)
    assert [(r.name, r.label, r.ok) for r in c.rows] == [("s1", 1, True), ("s2", 0, True), ("s3", 1, True)]
    csv.write_text("case_id,image,label\npatient_0,s1,1\n")  # the name column is the name-like one
    assert [(r.name, r.ok) for r in read_cohort(csv).rows] == [("s1", True)]


def test_two_files_of_one_name_in_a_manifest_are_named_as_such(tmp_path):
    """`a/s1.tif` and `b/s1.tif` were called "slide 's1' is listed again": the docs promise the real problem
    (two files whose outputs would collide; rename one)."""
    _touch(tmp_path / "a" / "s1.tif")
    _touch(tmp_path / "b" / "s1.tif")
    (tmp_path / "m.csv").write_text("slide,label\na/s1.tif,1\nb/s1.tif,0\n")
    with pytest.raises(CohortError, match=r"line 3: .*b/s1.tif and .*a/s1.tif \(line 2\) are different files of "
                                          r"one slide name 's1'.*rename one"):
        read_cohort(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("slide,label\na/s1.tif,1\n./a/s1.tif,0\n")  # one file written twice
    with pytest.raises(CohortError, match="slide 's1' is listed again"):
        read_cohort(tmp_path / "m.csv")
