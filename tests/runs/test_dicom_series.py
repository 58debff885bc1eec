"""A DICOM series is one slide wherever a run meets its files: given one by one, in a table, by its folder, and
when its other files change. The series is the headers in tests/io/dicom_series (no pixels: nothing is read)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli_captured, shared_file

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
    assert [(t.name, t.path) for t in tasks] == [("4-level0", str(series / "4-level0.dcm"))], tasks
    assert err.getvalue().splitlines() == [f"{series / '4-level0.dcm'}: one slide, run once, for the 3 file(s) of "
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
