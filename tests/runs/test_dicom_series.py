"""A DICOM series is one slide wherever a run meets its files: given one by one, in a table, by its folder, and
when its other files change. The series is the headers in tests/io/dicom_series (no pixels: nothing is read)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli_captured, shared_file

SERIES_UID = "1.2.826.0.1.3680043.8.498.21533225775113430883588726851558695975"
HEADERS = Path(__file__).parent.parent / "io" / "dicom_series"


@pytest.fixture
def series(tmp_path) -> Path:
    """A folder named by its series UID, as IDC lays slides out, holding the four files of one series."""
    folder = tmp_path / "root" / SERIES_UID
    folder.mkdir(parents=True)
    for f in HEADERS.glob("*.dcm"):
        shutil.copy(f, folder / f.name)
    return folder


def test_files_of_one_series_given_one_by_one_run_once_as_the_folders_slide(series):
    """`predict S/*.dcm` ran the same slide once per file (four outputs, four identical probabilities)."""
    from wsi_vssm.progress import Progress
    from wsi_vssm.runs.runner import slide_tasks

    err = io.StringIO()
    given = [str(f) for f in sorted(series.glob("*.dcm"))]
    tasks = slide_tasks(given, Progress(err=err))
    assert [(t.name, t.path) for t in tasks] == [(SERIES_UID, str(series / "4-level0.dcm"))], tasks
    assert err.getvalue().splitlines() == [f"{series / '4-level0.dcm'}: one slide, run once, for the 4 file(s) of "
                                           "its DICOM series given (1-overview.dcm, 2-thumbnail.dcm, ...)"], err
    # the label alone (a slide list's row) is the same slide, under the same name
    assert [t.path for t in slide_tasks([str(series / "3-label.dcm")])] == [str(series / "4-level0.dcm")]


def test_a_changed_file_of_the_series_redoes_the_slide(series):
    """Only the opened file was compared: a series that lost its base level reported the old result as done."""
    from wsi_vssm.runs.state import input_changed, input_fingerprint

    level0 = series / "4-level0.dcm"
    recorded = input_fingerprint(level0)
    assert [name for name, *_ in recorded["series"]] == ["1-overview.dcm", "2-thumbnail.dcm", "3-label.dcm"]
    assert not input_changed(recorded, level0)
    label = series / "3-label.dcm"
    label.write_bytes(label.read_bytes() + b"\0\0")  # rewritten, one more level or a new label: another size
    assert input_changed(recorded, level0)
    recorded = input_fingerprint(level0)
    (series / "2-thumbnail.dcm").unlink()
    assert input_changed(recorded, level0)
    plain = series.parent / "a.svs"  # any other slide keeps its old fingerprint, read as before
    plain.write_bytes(b"x" * 100)
    assert "series" not in input_fingerprint(plain) and not input_changed(input_fingerprint(plain), plain)


def test_tables_name_a_series_by_its_folder_and_list_it_once(series, tmp_path):
    from wsi_vssm.runs.cohort import CohortError, index_slides, read_manifest
    from wsi_vssm.runs.slide_args import read_slide_list

    root = series.parent
    (root / "list.csv").write_text(f"slide,label\n{SERIES_UID},1\n")
    [row] = read_manifest(root / "list.csv").rows
    assert (row.name, row.path, row.error) == (SERIES_UID, series / "4-level0.dcm", None), row
    assert read_slide_list(root / "list.csv") == [(str(series / "4-level0.dcm"), None)]
    # a reference table that names slides by series UID (IDC's folder names) finds them
    assert index_slides(root)[SERIES_UID] == [series / "4-level0.dcm"]
    # every file of the series listed (`find -name '*.dcm'`): one slide counted four times in the AUC
    rows = "".join(f"{SERIES_UID}/{f.name},1\n" for f in sorted(series.glob("*.dcm")))
    (root / "all.csv").write_text("slide,label\n" + rows)
    with pytest.raises(CohortError, match=r"all.csv, line 3: .*2-thumbnail.dcm is a file of the DICOM series that "
                                          r"line 2 names .*1-overview.dcm\): one slide, listed twice"):
        read_manifest(root / "all.csv")


def test_folders_of_series_are_pointed_at_as_folders(series, tmp_path, capsys):
    """A root of series folders was told to give 'root/*/*.svs'; `*/*.dcm` would give every file of every series."""
    code, _, err = run_cli_captured(["info", series.parent], capsys)
    assert code == 1 and f"give its DICOM series folders, each one slide: '{series.parent / '*'}{os.sep}'" in err, err
    from wsi_vssm.runs.slide_args import subfolder_hint

    slides = tmp_path / "gdc" / "case1"
    slides.mkdir(parents=True)
    (slides / "a.ndpi").write_bytes(b"x")
    assert subfolder_hint(tmp_path / "gdc") == f"give their slides, e.g. '{tmp_path / 'gdc' / '*' / '*.ndpi'}'"


def test_a_series_without_its_image_says_so(series):
    """Removing a series' volume file gave only "OpenSlide cannot open it: No pyramid levels found"."""
    pytest.importorskip("openslide")
    from wsi_vssm.io import SlideError, open_slide

    (series / "4-level0.dcm").unlink()
    with pytest.raises(SlideError, match=r"has no volume \(pyramid level\) file, only 1 overview, 1 thumbnail, "
                                         r"1 label: the image itself is not there"):
        open_slide(series / "3-label.dcm")


def test_a_table_row_naming_a_folder_of_several_slides_says_what_it_is(tmp_path, capsys):
    """A row naming a folder of slides was told the folder held "no slide files directly in it"."""
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("boxes_0.dcm", "small.svs"):
        shutil.copy(shared_file("slides", name), folder / name)
    (tmp_path / "list.csv").write_text("slide\ntwo\n")
    code, _, err = run_cli_captured(["predict", tmp_path / "list.csv", "--out", tmp_path / "out"], capsys)
    assert code == 1 and "two: a folder of 2 slides, named as one slide: name each in a row of its own" in err, err


def test_a_table_naming_another_file_of_the_series_reads_it_as_the_folder_run_does(series):
    """`evaluate` named a series after the file its row gave (the label's UID), beside the same slide that a
    folder run had written under another name. The row now takes the name the outputs have (its folder's)."""
    from wsi_vssm.runs.cohort import read_manifest

    root = series.parent
    (root / "m.csv").write_text(f"slide,label\n{SERIES_UID}/3-label.dcm,1\n")
    [row] = read_manifest(root / "m.csv").rows
    assert (row.name, row.path) == (SERIES_UID, series / "4-level0.dcm"), row  # the name its outputs take


def test_reference_names_find_series_folders_however_their_files_are_named(series, tmp_path):
    """Files named without `.dcm` were not looked for; a folder of two series gave "no slide file named"."""
    from wsi_vssm.runs.cohort import index_slides

    root = series.parent
    for f in series.glob("*.dcm"):
        f.rename(f.with_suffix(""))  # IM000001-style names
    assert index_slides(root)[SERIES_UID] == [series / "4-level0"]
    two = root / "two"
    shutil.copytree(series, two)
    (two / "other.dcm").write_bytes((HEADERS / "4-level0.dcm").read_bytes().replace(SERIES_UID.encode(),
                                                                                   SERIES_UID[:-1].encode() + b"9"))
    assert index_slides(root)["two"] == [two], "a folder of two series is found, and its run says what it holds"


def test_a_damaged_file_beside_a_series_is_said_and_leaves_the_series_one_slide(series):
    from wsi_vssm.io.dicom import folder_slide, open_failure_hint, read_tags

    label = series / "3-label.dcm"
    label.write_bytes(label.read_bytes()[:600])  # cut inside its header: ImageType read, the series UID not
    assert read_tags(label) is None
    assert folder_slide(series, (".dcm", ".svs")) == series / "4-level0.dcm"
    assert open_failure_hint(label) == ("; its DICOM header cannot be read (a damaged file, or a big-endian or "
                                        "deflated one)")
    (series / "x.dcm").mkdir()  # a folder that only looks like a slide's name
    assert folder_slide(series, (".dcm", ".svs")) == series / "4-level0.dcm"


def test_a_copied_series_is_the_same_slide_and_a_rewritten_file_is_not(series, tmp_path):
    """The check compared the other files' times: a plain copy of a series was "another slide of the same name"."""
    import time

    from wsi_vssm.runs.state import input_changed, input_fingerprint

    recorded = input_fingerprint(series / "4-level0.dcm")
    time.sleep(0.01)
    copy = tmp_path / "copy"
    shutil.copytree(series, copy, copy_function=shutil.copy)  # new times, same bytes
    assert input_fingerprint(copy / "4-level0.dcm")["series"] == recorded["series"]
    assert not input_changed(recorded, series / "4-level0.dcm")
    os.utime(series / "1-overview.dcm", ns=(1, 1))  # touched: still the same file
    assert not input_changed(recorded, series / "4-level0.dcm")
    raw = bytearray((series / "1-overview.dcm").read_bytes())
    raw[-1] ^= 0xFF  # same size, other bytes
    (series / "1-overview.dcm").write_bytes(bytes(raw))
    assert input_changed(recorded, series / "4-level0.dcm")


def test_a_folder_is_grouped_once_for_all_its_files(series, monkeypatch):
    """Each file re-listed and re-read the whole folder: 2,000 files took minutes before any slide ran."""
    import wsi_vssm.io.dicom as dicom

    listed, read = [], []
    real_list, real_read = dicom.dicom_files, dicom.read_tags
    monkeypatch.setattr(dicom, "dicom_files", lambda folder: listed.append(folder) or real_list(folder))
    monkeypatch.setattr(dicom, "read_tags", lambda path, *a: read.append(Path(path).name) or real_read(path, *a))
    files = sorted(series.glob("*.dcm"))
    assert {dicom.series_of(f)[0] for f in files} == {series / "4-level0.dcm"}
    assert len(listed) == 1, listed  # the folder listed (and each file's size and time read) once, not per file
    assert len(read) == 2 * len(files), read  # each header once for the folder, once for the file asked about


def test_a_table_row_naming_an_empty_folder_says_it_is_empty(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.csv").write_text("slide\nempty\n")
    code, _, err = run_cli_captured(["predict", tmp_path / "list.csv", "--out", tmp_path / "out"], capsys)
    assert code == 1 and "empty: an empty folder, not a slide" in err and "*.svs" not in err, err


def test_two_rows_reaching_one_series_by_other_spellings_are_refused(series):
    """`S/3-label.dcm` and `LINK/1-overview.dcm` (a link to S) were two slides in the AUC."""
    from wsi_vssm.runs.cohort import CohortError, read_manifest

    root = series.parent
    (root / "link").symlink_to(series)
    (root / "m.csv").write_text(f"slide,label\n{SERIES_UID}/3-label.dcm,1\nlink/1-overview.dcm,1\n")
    with pytest.raises(CohortError, match=r"line 3: .*1-overview.dcm is a file of the DICOM series that line 2"):
        read_manifest(root / "m.csv")


def test_spellings_of_one_path_make_one_line_and_a_folder_of_one_slide_is_named(series, monkeypatch, tmp_path,
                                                                                 capsys):
    from wsi_vssm.progress import Progress
    from wsi_vssm.runs.runner import slide_tasks

    monkeypatch.chdir(series.parent)
    err = io.StringIO()
    tasks = slide_tasks([f"./{SERIES_UID}/1-overview.dcm", f"./{SERIES_UID}/4-level0.dcm"], Progress(err=err))
    assert len(tasks) == 1 and len(err.getvalue().splitlines()) == 1, err.getvalue()
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(shared_file("slides", "small.svs"), one / "x.svs")
    (tmp_path / "list.csv").write_text("slide\none\n")
    code, _, err = run_cli_captured(["predict", tmp_path / "list.csv", "--out", tmp_path / "out"], capsys)
    assert code == 1 and "one: a folder holding one slide (x.svs), not a slide itself: name that file" in err, err


def _unlistable(monkeypatch, name: str) -> None:
    """Listing a folder of this name fails as it does without read permission (root's tests cannot chmod it)."""
    real = Path.iterdir

    def iterdir(self):
        if self.name == name:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)


def test_a_sub_folder_that_cannot_be_read_leaves_the_hint_to_the_next(tmp_path, monkeypatch):
    """A PermissionError from one sub-folder stopped the whole run (it was a one-line failure of that slide)."""
    from wsi_vssm.runs.slide_args import subfolder_hint

    for name, slide in (("a_locked", "x.svs"), ("b", "y.ndpi")):
        (tmp_path / "r" / name).mkdir(parents=True)
        (tmp_path / "r" / name / slide).write_bytes(b"x")
    _unlistable(monkeypatch, "a_locked")
    assert subfolder_hint(tmp_path / "r") == f"give their slides, e.g. '{tmp_path / 'r' / '*' / '*.ndpi'}'"


def test_a_folder_that_cannot_be_listed_fails_alone_saying_so(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    _unlistable(monkeypatch, "locked")
    code, _, err = run_cli_captured(["predict", locked, shared_file("slides", "small.svs"), "--out",
                                     tmp_path / "out"], capsys)
    assert "Traceback" not in err and f"{locked}: a folder that cannot be listed (Permission denied)" in err, err
    assert code == 3 and "1 of 2 slide(s) failed" in err, err


@pytest.mark.parametrize("file_of_the_name", ["4-level0.dcm", "3-label.dcm"])
def test_a_series_folder_named_like_one_of_its_files_is_one_slide(series, file_of_the_name):
    """A reference name `S1` found both the folder `S1` and its file `S1.dcm` (the base level, or its label):
    "several slide files named 'S1'", listing one slide twice or two files of one series."""
    from wsi_vssm.runs.cohort import read_cohort

    folder = series.parent / "S1"
    series.rename(folder)
    (folder / file_of_the_name).rename(folder / "S1.dcm")
    (folder.parent / "reference.csv").write_text("slide,label\nS1,tumor\n")
    base = folder / ("S1.dcm" if file_of_the_name == "4-level0.dcm" else "4-level0.dcm")
    row = read_cohort(folder.parent / "reference.csv").rows[0]
    assert (row.name, row.path, row.error) == ("S1", base, None), row


def test_a_folder_of_one_series_names_its_slide_whatever_its_files_are_named(series, monkeypatch):
    """Converters name each slide's files alike (`wsi-000000.dcm` in every folder): two slides were one name,
    and the second failed ("another slide of this run has the name ..."). A folder holding one series names it;
    a series beside another slide keeps its base level's name."""
    from wsi_vssm.io.base import output_name
    from wsi_vssm.io.slide import open_slide
    from wsi_vssm.runs.runner import slide_tasks

    root = series.parent
    for name in ("T1", "N1"):
        (root / name).mkdir()
        shutil.copy(HEADERS / "4-level0.dcm", root / name / "wsi-000000.dcm")
        shutil.copy(HEADERS / "3-label.dcm", root / name / "wsi-000001.dcm")
    tasks = slide_tasks([str(root / "T1" / "wsi-000000.dcm"), str(root / "N1" / "wsi-000001.dcm")])
    assert [(t.name, Path(t.path)) for t in tasks] == [("T1", root / "T1" / "wsi-000000.dcm"),
                                                      ("N1", root / "N1" / "wsi-000000.dcm")], tasks
    assert output_name(root / "N1" / "wsi-000001.dcm") == "N1"  # any file of it: the name a table's row reaches
    (root / "T1" / "other.svs").write_bytes(b"x")  # no longer a folder of one slide
    assert output_name(root / "T1" / "wsi-000000.dcm") == "wsi-000000"
    assert output_name(root / "N1.svs") == "N1" and output_name(series / "missing.dcm") == "missing"
    with open_slide(root / "N1" / "wsi-000001.dcm") as slide:  # what predict writes its outputs under
        assert slide.name == "N1"
    monkeypatch.chdir(root / "N1")  # `predict .` inside the folder: its name, not "."
    assert [t.name for t in slide_tasks(["wsi-000000.dcm"])] == ["N1"]


def test_tables_give_a_series_the_name_its_outputs_take(series, tmp_path):
    """With series named after their folders, tables kept the file names they were written with: a manifest of
    each slide's `wsi-000000.dcm` was refused as one name twice, a table naming UID files gave predictions.csv
    rows that no output folder had, and `train mil` found no feature store for them. A folder's dotted name
    (`case.v2`) lost its "extension", so two slides collided; a feature store written into the folder made the
    series no folder of one slide."""
    from wsi_vssm.io.base import output_name
    from wsi_vssm.runs.cohort import read_cohort, read_manifest

    root = series.parent
    for name in ("T1", "N1", "case.v2", "case.v3"):
        (root / name).mkdir()
        shutil.copy(HEADERS / "4-level0.dcm", root / name / "wsi-000000.dcm")
        shutil.copy(HEADERS / "3-label.dcm", root / name / "wsi-000001.dcm")
    (root / "m.csv").write_text("slide,label\nT1/wsi-000000.dcm,1\nN1/wsi-000001.dcm,0\ncase.v2,1\ncase.v3,0\n")
    for find in (True, False):  # train mil reads tables without looking for slides: the names are the same
        rows = read_manifest(root / "m.csv", find_slides=find).rows
        assert [r.name for r in rows] == ["T1", "N1", "case.v2", "case.v3"], rows
    assert [output_name(root / n / "wsi-000001.dcm") for n in ("case.v2", "case.v3")] == ["case.v2", "case.v3"]
    (root / "reference.csv").write_text("slide,label\ncase.v2,1\n4-level0,0\n")  # a folder; a file's stem
    rows = read_cohort(root / "reference.csv").rows
    assert [(r.name, r.path, r.error) for r in rows] == [("case.v2", root / "case.v2" / "wsi-000000.dcm", None),
                                                         (SERIES_UID, series / "4-level0.dcm", None)], rows
    (root / "T1" / "T1.zarr").mkdir()  # `extract . -o .` inside it: a feature store is no slide
    assert output_name(root / "T1" / "wsi-000001.dcm") == "T1"
    (root / "T1" / "other.tif").write_bytes(b"x")  # another slide beside it: named after its base level,
    assert output_name(root / "T1" / "wsi-000001.dcm") == "wsi-000000"  # whichever file is given


def test_outputs_written_beside_a_series_do_not_read_its_headers_again(series, monkeypatch):
    """With --out the slides' own folder each new output folder moved the folder's mtime, and the next slide read
    every header of the folder again (309 ms a slide beside 400 series)."""
    import wsi_vssm.io.dicom as dicom

    read = []
    real_read = dicom.read_tags
    monkeypatch.setattr(dicom, "read_tags", lambda path, *a: read.append(Path(path).name) or real_read(path, *a))
    level0 = series / "4-level0.dcm"
    assert dicom.series_of(level0)[0] == level0 and dicom.folder_slide(series, (".svs",)) == level0
    before = len(read)
    (series / SERIES_UID).mkdir()  # a slide's output folder, and the cohort's table
    (series / "predictions.csv").write_text("slide\n")
    os.utime(series, ns=(1, 1))  # the folder's mtime moved (whatever the file system's time resolution)
    assert dicom.series_of(level0)[0] == level0 and dicom.folder_slide(series, (".svs",)) == level0
    assert read[before:] == ["4-level0.dcm"], read[before:]  # the file asked about, not the folder's headers
    shutil.copy(series / "3-label.dcm", series / "5-label.dcm")  # a DICOM file added: the series are read again
    os.utime(series, ns=(2, 2))
    assert dicom.series_of(level0)[0] == level0 and len(read) - before > len(list(series.glob("*.dcm")))


def test_a_rerun_reads_no_other_file_of_an_unchanged_series(series, monkeypatch):
    """The rerun check hashed the head and tail of every other file of each up-to-date series, although their
    sizes and times were as recorded."""
    import json

    import wsi_vssm.io.dicom as dicom
    from wsi_vssm.runs.state import input_changed, input_fingerprint

    level0 = series / "4-level0.dcm"
    recorded = json.loads(json.dumps(input_fingerprint(level0)))  # as the state file keeps it
    stamped = []
    real_stamp = dicom._stamp
    monkeypatch.setattr(dicom, "_stamp", lambda f: stamped.append(f.name) or real_stamp(f))
    assert not input_changed(recorded, level0) and stamped == []
    os.utime(series / "1-overview.dcm", ns=(1, 1))  # touched: its content is looked at, and is the same
    assert not input_changed(recorded, level0) and "1-overview.dcm" in stamped
    old = {k: v for k, v in recorded.items() if k != "series_times"}  # a state from before: the content decides
    assert not input_changed(old, level0)


def test_a_file_replaced_under_its_name_regroups_the_folder(series):
    """A file deleted and written again under its name can take the same inode at once (ext4): the grouping must
    not take the folder for unchanged."""
    import wsi_vssm.io.dicom as dicom

    level0 = series / "4-level0.dcm"
    assert len(dicom.series_of(level0)[1]) == 4
    (series / "3-label.dcm").unlink()
    (series / "3-label.dcm").write_bytes(b"no longer a DICOM file")
    os.utime(series, ns=(3, 3))
    assert [f.name for f, _ in dicom.series_of(level0)[1]] == ["1-overview.dcm", "2-thumbnail.dcm", "4-level0.dcm"]
