"""io.dicom: the header walk that finds a DICOM file's series, and a folder's files grouped into slides."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from conftest import shared_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsi_vssm.io.dicom import COLUMNS, IMAGE_TYPE, ROWS, SERIES_UID, read_tags, series_text, slide_series

EXPLICIT, IMPLICIT, BIG_ENDIAN = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"


def _even(value: bytes, pad: bytes = b" ") -> bytes:
    return value + pad if len(value) % 2 else value


def _element(tag: tuple[int, int], vr: bytes, value: bytes, explicit: bool, undefined: bool = False) -> bytes:
    head = struct.pack("<HH", *tag)
    length = 0xFFFFFFFF if undefined else len(value)
    if not explicit:
        return head + struct.pack("<I", length) + value
    if vr in (b"OB", b"SQ", b"UN", b"UT"):
        return head + vr + b"\0\0" + struct.pack("<I", length) + value
    return head + vr + struct.pack("<H", length) + value


def _item(body: bytes, undefined: bool) -> bytes:
    if not undefined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
    return struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + body + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)


def dicom_file(path, series: str | None, image_type: str = "ORIGINAL\\PRIMARY\\VOLUME\\NONE",
               syntax: str = EXPLICIT, size: tuple[int, int] | None = None) -> None:
    """A Part 10 file as a WSI converter writes one: file meta, ImageType, a nested sequence of undefined
    length (items of both kinds) before the series, the series UID, then pixel data that must never be read."""
    explicit = syntax != IMPLICIT
    syntax_value = _even(syntax.encode(), b"\0")
    meta = _element((0x0002, 0x0001), b"OB", b"\0\1", True) + _element((0x0002, 0x0010), b"UI", syntax_value, True)
    meta = _element((0x0002, 0x0000), b"UL", struct.pack("<I", len(meta)), True) + meta
    inner = _element((0x0008, 0x0100), b"SH", b"123456", explicit)
    nested = _element((0x0040, 0xA730), b"SQ", _item(inner, undefined=True) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0),
                      explicit, undefined=True)
    sequence = _item(inner + nested, undefined=False) + _item(inner, undefined=True)
    body = _element(IMAGE_TYPE, b"CS", _even(image_type.encode()), explicit)
    body += _element((0x0008, 0x0110), b"SQ", sequence + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), explicit,
                     undefined=True)
    body += _element((0x0010, 0x0010), b"PN", _even(b"Doe^J"), explicit)
    if series is not None:
        body += _element(SERIES_UID, b"UI", _even(series.encode(), b"\0"), explicit)
    if size is not None:  # TotalPixelMatrixColumns, Rows
        body += _element((0x0048, 0x0006), b"UL", struct.pack("<I", size[0]), explicit)
        body += _element((0x0048, 0x0007), b"UL", struct.pack("<I", size[1]), explicit)
    body += _element((0x7FE0, 0x0010), b"OB", b"\xff" * 64, explicit)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta + body)


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
def test_the_series_is_found_past_nested_sequences(tmp_path, syntax):
    dicom_file(tmp_path / "a.dcm", "1.2.3.4", syntax=syntax)
    tags = read_tags(tmp_path / "a.dcm")
    assert tags == {IMAGE_TYPE: "ORIGINAL\\PRIMARY\\VOLUME\\NONE", SERIES_UID: "1.2.3.4"}, tags


def test_files_the_walk_cannot_read_give_none(tmp_path):
    dicom_file(tmp_path / "be.dcm", "1.2", syntax=BIG_ENDIAN)
    good = tmp_path / "good.dcm"
    dicom_file(good, "1.2")
    (tmp_path / "cut.dcm").write_bytes(good.read_bytes()[:150])  # cut inside the file meta group
    (tmp_path / "plain.dcm").write_bytes(b"not a dicom file at all" * 10)
    for name in ("be.dcm", "cut.dcm", "plain.dcm", "missing.dcm"):
        assert read_tags(tmp_path / name) is None, name
    dicom_file(tmp_path / "no_series.dcm", None)
    assert SERIES_UID not in read_tags(tmp_path / "no_series.dcm")


def test_one_slide_per_series_opened_through_its_volume_file(tmp_path):
    files = {
        "a_label.dcm": ("1.1", "ORIGINAL\\PRIMARY\\LABEL\\NONE"),
        "b_level0.dcm": ("1.1", "ORIGINAL\\PRIMARY\\VOLUME\\NONE"),
        "c_other.dcm": ("2.2", "DERIVED\\PRIMARY\\THUMBNAIL\\RESAMPLED"),  # a series of one file, no volume
        "d_level1.dcm": ("1.1", "DERIVED\\PRIMARY\\VOLUME\\RESAMPLED"),
    }
    for name, (series, image_type) in files.items():
        dicom_file(tmp_path / name, series, image_type)
    (tmp_path / "e_damaged.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    (tmp_path / "f.svs").write_bytes(b"x")
    paths = sorted(tmp_path.iterdir())
    got = [(opened.name, [(f.name, kind) for f, kind in series]) for opened, series in slide_series(paths)]
    assert got == [
        ("b_level0.dcm", [("a_label.dcm", "label"), ("b_level0.dcm", "volume"), ("d_level1.dcm", "volume")]),
        ("c_other.dcm", [("c_other.dcm", "thumbnail")]),  # where its first file lies by name
        ("e_damaged.dcm", [("e_damaged.dcm", "")]),  # alone: the reader says what is wrong with it
        ("f.svs", [("f.svs", "")]),
    ], got
    assert series_text(slide_series(paths)[0][1]) == "1 label, 2 volume"


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
def test_the_series_is_opened_through_its_base_level_whatever_the_names(tmp_path, syntax):
    """The first volume by name named the slide: removing a lower level renamed it, and a table naming the base
    level ran it again under another name."""
    for name, size in [("a.dcm", (512, 400)), ("b.dcm", (2048, 1600)), ("c.dcm", (1024, 800))]:
        dicom_file(tmp_path / name, "7.7", syntax=syntax, size=size)
    assert read_tags(tmp_path / "b.dcm")[COLUMNS] == 2048
    [(opened, _)] = slide_series(sorted(tmp_path.glob("*.dcm")))
    assert opened.name == "b.dcm"
    (tmp_path / "c.dcm").unlink()
    assert slide_series(sorted(tmp_path.glob("*.dcm")))[0][0].name == "b.dcm"


def test_a_folder_of_one_real_dicom_series_is_one_slide(tmp_path):
    from wsi_vssm.io.slide import open_slide
    from wsi_vssm.runs.slide_args import expand_slide_folders

    d = tmp_path / "series"
    d.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):  # openslide-python's fixture: a volume and its thumbnail
        shutil.copy(shared_file("slides", name), d / name)
    said: list[str] = []
    assert expand_slide_folders([str(d)], said.append) == [str(d / "boxes_0.dcm")]
    assert said == [f"{d / 'boxes_0.dcm'}: one slide, a DICOM series of 2 files (1 volume, 1 thumbnail)"], said
    # the thumbnail alone is still the slide OpenSlide makes of it: nothing is dropped that would not be read
    with open_slide(d / "boxes_1.dcm") as s:
        assert s.dimensions == (16, 16)


def test_a_converters_series_headers_are_walked(tmp_path):
    """Headers wsidicomizer wrote for CMU-1's small region (tests/io/dicom_series/README.md): four instances of
    one series, found as one slide opened through its pyramid level, which sorts last by name."""
    folder = Path(__file__).parent / "dicom_series"
    files = sorted(folder.glob("*.dcm"))
    kinds = {f.name: read_tags(f)[IMAGE_TYPE] for f in files}
    assert kinds == {"1-overview.dcm": "ORIGINAL\\PRIMARY\\OVERVIEW\\NONE", "2-thumbnail.dcm":
                     "ORIGINAL\\PRIMARY\\THUMBNAIL\\NONE", "3-label.dcm": "ORIGINAL\\PRIMARY\\LABEL\\NONE",
                     "4-level0.dcm": "ORIGINAL\\PRIMARY\\VOLUME\\NONE"}, kinds
    series_uid = "1.2.826.0.1.3680043.8.498.21533225775113430883588726851558695975"
    assert {read_tags(f)[SERIES_UID] for f in files} == {series_uid}
    [(opened, series)] = slide_series(files)
    assert opened.name == "4-level0.dcm" and series_text(series) == "1 overview, 1 thumbnail, 1 label, 1 volume"


def test_nesting_without_end_is_unreadable_not_a_crash(tmp_path):
    """Sequences nested thousands deep (a damaged file) gave a RecursionError out of the folder's expansion."""
    good = (Path(__file__).parent / "dicom_series" / "4-level0.dcm").read_bytes()
    meta_end = good.index(b"\x08\x00\x08\x00CS")  # ImageType, the data set's first element
    open_sequence = struct.pack("<HH", 0x0008, 0x0110) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
    open_item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    (tmp_path / "deep.dcm").write_bytes(good[:meta_end] + (open_sequence + open_item) * 5000)
    assert read_tags(tmp_path / "deep.dcm") is None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_headers_give_none_or_text_never_an_error(tmp_path, data):
    """A real header with bytes changed, or cut: read_tags answers None or {tag: text or size}, never raises."""
    good = (Path(__file__).parent / "dicom_series" / "4-level0.dcm").read_bytes()
    raw = bytearray(good)
    for _ in range(data.draw(st.integers(0, 8))):
        raw[data.draw(st.integers(132, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "fuzz.dcm"
    path.write_bytes(bytes(raw))
    tags = read_tags(path)
    assert tags is None or all(isinstance(v, str | int) for v in tags.values()), tags
    assert tags is None or all(isinstance(tags[k], int) for k in (COLUMNS, ROWS) if k in tags), tags


@pytest.mark.parametrize("value", [b"", struct.pack("<II", 100, 5)], ids=["empty", "two values"])
def test_a_size_that_is_not_one_number_is_unknown_not_an_error(tmp_path, value):
    """An empty or two-valued TotalPixelMatrixColumns was kept as text, and grouping the folder raised
    ValueError (int('')): one damaged file stopped `predict FOLDER` and `info` with a traceback."""
    good = tmp_path / "good.dcm"
    dicom_file(good, "1.2.9", size=(100, 80))
    one = struct.pack("<HH", 0x0048, 0x0006) + b"UL" + struct.pack("<HI", 4, 100)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(good.read_bytes().replace(one, one[:6] + struct.pack("<H", len(value)) + value))
    tags = read_tags(bad)
    assert COLUMNS not in tags and tags[SERIES_UID] == "1.2.9", tags
    good.unlink()
    assert slide_series([bad]) == [(bad, [(bad, "volume")])]


def test_dicom_files_named_without_dcm_are_slides_of_their_own_names(tmp_path):
    """DICOM media name files `IM000001`, exports by UID without `.dcm`: such a folder had "no slide files", and
    a UID's last part was dropped as if it were an extension, so every file of one UID root had one name."""
    from wsi_vssm.io.base import slide_name
    from wsi_vssm.runs.slide_args import expand_slide_folders

    folder = Path(__file__).parent / "dicom_series"
    d = tmp_path / "export"
    d.mkdir()
    for f, name in zip(sorted(folder.glob("*.dcm")), ["IM000001", "IM000002", "1.2.826.9.3", "1.2.826.9.4"],
                       strict=True):
        shutil.copy(f, d / name)
    (d / "notes.7").write_text("not a slide")  # a digit suffix alone does not make a slide
    (d / "README").write_text("nor does no suffix")
    said: list[str] = []
    assert expand_slide_folders([str(d)], said.append) == [str(d / "1.2.826.9.4")], said  # the pyramid level
    assert said == [f"{d / '1.2.826.9.4'}: one slide, a DICOM series of 4 files (1 label, 1 volume, 1 overview, "
                    "1 thumbnail)"], said
    assert [slide_name(n) for n in ("1.2.826.9.4", "IM000001", "a.v2.tif", "b.ome.tiff", "c.dcm")] == [
        "1.2.826.9.4", "IM000001", "a.v2", "b", "c"]


def test_an_undefined_length_un_element_is_walked_as_implicit_vr(tmp_path):
    """A private sequence written as UN of undefined length holds implicit VR data: walked as explicit, the header
    was unreadable and the series split in two (each file then ran as the same slide)."""
    good = (Path(__file__).parent / "dicom_series" / "4-level0.dcm").read_bytes()
    at = good.index(b"\x08\x00\x08\x00CS")  # ImageType, the data set's first element; (0008,0006) comes before it
    inner = struct.pack("<HHI", 0x0008, 0x0100, 6) + b"123456"  # implicit VR: tag, 4-byte length, value
    un = (struct.pack("<HH", 0x0008, 0x0006) + b"UN\0\0" + struct.pack("<I", 0xFFFFFFFF) + _item(inner, True)
          + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    (tmp_path / "un.dcm").write_bytes(good[:at] + un + good[at:])
    tags = read_tags(tmp_path / "un.dcm")
    assert tags is not None and tags[SERIES_UID] == read_tags(Path(__file__).parent / "dicom_series" /
                                                              "4-level0.dcm")[SERIES_UID], tags


def test_a_dicomdir_is_no_slide_and_a_file_ending_between_elements_is_read(tmp_path):
    from wsi_vssm.io.dicom import open_failure_hint
    from wsi_vssm.runs.slide_args import expand_slide_folders

    good = (Path(__file__).parent / "dicom_series" / "4-level0.dcm").read_bytes()
    at = good.index(b"\x08\x00\x08\x00CS")
    shutil.copy(Path(__file__).parent / "dicom_series" / "4-level0.dcm", tmp_path / "IM000001")
    (tmp_path / "DICOMDIR").write_bytes(good[:at] + _element((0x0004, 0x1130), b"CS", b"MEDIA ", True))
    assert expand_slide_folders([str(tmp_path)]) == [str(tmp_path / "IM000001")]  # the medium's index is no slide
    (tmp_path / "no_series").write_bytes(good[:at] + _element(IMAGE_TYPE, b"CS", b"ORIGINAL", True))
    assert read_tags(tmp_path / "no_series") == {IMAGE_TYPE: "ORIGINAL"}  # it ends cleanly: read, not damaged
    assert open_failure_hint(tmp_path / "no_series") == "; its DICOM header names no series: no slide image"


def test_a_fifo_among_the_files_is_not_opened(tmp_path):
    """`index_slides` opened a FIFO named like DICOM media to look for `DICM`, and hung."""
    import os
    import threading

    from wsi_vssm.runs.cohort import index_slides

    (tmp_path / "sub").mkdir()
    os.mkfifo(tmp_path / "sub" / "pipe")
    result = []
    worker = threading.Thread(target=lambda: result.append(index_slides(tmp_path)), daemon=True)
    worker.start()
    worker.join(20)
    assert result == [{}], "index_slides blocked on a FIFO"
