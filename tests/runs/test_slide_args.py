"""runs.slide_args: what a folder or a slide list given on the command line expands to."""

from __future__ import annotations

import pytest

from wsi_vssm.runs.slide_args import expand_slide_args, expand_slide_folders, read_slide_list


def test_a_folder_expands_to_its_slides_only(tmp_path, cohort):
    import shutil

    d = tmp_path / "slides"
    d.mkdir()
    shutil.copy(cohort / "normal_001.tif", d / "a.tif")
    (d / "._a.tif").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata beside a slide on a share
    (d / ".hidden.svs").write_bytes(b"x")
    (d / "notes.txt").write_text("x")
    (d / "B.SVS").write_bytes(b"x")  # a suffix in capitals is still a slide
    import numpy as np

    from wsi_vssm.outputs.heatmap import write_heatmap_zarr

    # a wsi-vssm heatmap left among the slides is an output, not a slide (an OME-Zarr slide would be one)
    write_heatmap_zarr(d / "old_heatmap.zarr", np.zeros((4, 4), np.float32), 32.0, (0.0, 0.0), 1.0, attrs={})
    assert expand_slide_folders([str(d)]) == [str(d / "B.SVS"), str(d / "a.tif")]


def test_a_slide_list_in_capitals_is_read_as_a_list(tmp_path):
    (tmp_path / "LIST.CSV").write_text("slide,mpp\na.tif,0.5\n")
    assert expand_slide_args([str(tmp_path / "LIST.CSV")]) == [(str(tmp_path / "a.tif"), 0.5)]


@pytest.mark.parametrize("ref", [".", ".."])
def test_a_slide_list_row_naming_a_folder_is_refused_with_its_line(tmp_path, ref):
    from wsi_vssm.runs.cohort import CohortError

    (tmp_path / "list.csv").write_text(f"slide\na.tif\n{ref}\n")
    with pytest.raises(CohortError, match=rf"list.csv, line 3: '{ref}' names a folder"):
        read_slide_list(tmp_path / "list.csv")


@pytest.mark.parametrize("cell", ["1,25", "0,25"])
def test_a_slide_list_with_a_decimal_comma_in_its_mpp_is_refused_as_a_manifest_is(tmp_path, cell):
    """`1,25` ran the slide at 1 um/px with only the usual override warning; `0,25` was refused as "mpp '0'"
    with no hint. A slide list's mpp column is read as a manifest's (docs/cohorts.md)."""
    from wsi_vssm.runs.cohort import CohortError

    (tmp_path / "list.csv").write_text(f"path,mpp\na.tif,0.5\nb.tif,{cell}\n")
    with pytest.raises(CohortError, match=r"list\.csv, line 3: 3 fields under a header of 2: a decimal comma in the "
                                          r"mpp \(0,25\)\? write 0\.25"):
        read_slide_list(tmp_path / "list.csv")


def test_a_slide_list_column_that_looks_like_a_resolution_but_is_not_read_is_warned_about(tmp_path):
    (tmp_path / "list.csv").write_text("wsi,mpp_x\na.tif,0.5\n")
    with pytest.warns(UserWarning, match=r"list\.csv: column 'mpp_x' is not read as the slides' resolution"):
        assert read_slide_list(tmp_path / "list.csv") == [(str(tmp_path / "a.tif"), None)]
