"""DICOM WSI series in a folder. A DICOM slide is a series of files (one per pyramid level, plus label, overview
and thumbnail images), and OpenSlide reads the whole series from any one of them. So a folder of slides
holds one slide per series, not per file: `slide_series` groups the files by SeriesInstanceUID.

The tags needed (the series, the image type, a pyramid level's size) are read by walking the file's header
(standard library only, and no pixel data read): a Part 10 file (`DICM` at byte 128) in explicit or implicit VR
little endian. Anything else (big endian, deflated, no preamble, a damaged header) gives None, and that file is
kept as a slide of its own, so the reader says what is wrong with it."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import struct
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

SERIES_UID = (0x0020, 0x000E)
IMAGE_TYPE = (0x0008, 0x0008)
COLUMNS = (0x0048, 0x0006)  # TotalPixelMatrixColumns and Rows: a pyramid level's size (UL)
ROWS = (0x0048, 0x0007)
_NUMBERS = {COLUMNS, ROWS}
_PIXEL_DATA = (0x7FE0, 0x0010)
_ITEM, _ITEM_END, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
_UNDEFINED = 0xFFFFFFFF
# explicit VRs whose length takes 4 bytes after 2 reserved ones (PS3.5 7.1.2)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_IMPLICIT_LE = "1.2.840.10008.1.2"
_NOT_WALKED = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # explicit big endian, deflated
_MAX_HEADER = 64 << 20  # a header longer than this is not a slide's: give up rather than read on
_MAX_DEPTH = 32
_STAMP_BYTES = 64 << 10


class _Unreadable(Exception):
    pass


class _Header:
    """Sequential reads of one DICOM header, explicit or implicit VR little endian."""

    def __init__(self, f: BinaryIO, explicit: bool):
        self.f, self.explicit = f, explicit

    def read(self, n: int) -> bytes:
        if self.f.tell() + n > _MAX_HEADER:
            raise _Unreadable
        data = self.f.read(n)
        if len(data) < n:
            raise _Unreadable
        return data

    def element(self) -> tuple[tuple[int, int], bytes | None, int]:
        """The next element's tag, VR (None in implicit VR and for items) and value length (0xFFFFFFFF:
        undefined), the file left at its value."""
        group, elem = struct.unpack("<HH", self.read(4))
        if group == 0xFFFE or not self.explicit:  # items and delimiters never carry a VR
            return (group, elem), None, struct.unpack("<I", self.read(4))[0]
        vr = self.read(2)
        if vr in _LONG_VRS:
            self.read(2)
            return (group, elem), vr, struct.unpack("<I", self.read(4))[0]
        return (group, elem), vr, struct.unpack("<H", self.read(2))[0]

    def skip(self, length: int, vr: bytes | None = None, depth: int = 0) -> None:
        """Past a value: `length` bytes, or an undefined-length sequence (or encapsulated data) item by item. An
        undefined-length UN holds implicit VR data (PS3.5 6.2.2), whatever the file's transfer syntax."""
        if length != _UNDEFINED:
            self.f.seek(length, 1)
            return
        if depth > _MAX_DEPTH:  # a damaged file could nest without end; real headers nest a few levels
            raise _Unreadable
        explicit = self.explicit
        self.explicit = explicit and vr != b"UN"
        try:
            while True:
                tag, _, item_length = self.element()
                if tag == _SEQUENCE_END:
                    return
                if tag != _ITEM:
                    raise _Unreadable
                if item_length != _UNDEFINED:
                    self.f.seek(item_length, 1)
                    continue
                while True:  # an item of undefined length: its elements up to the item delimiter
                    inner, inner_vr, inner_length = self.element()
                    if inner == _ITEM_END:
                        break
                    self.skip(inner_length, inner_vr, depth + 1)
        finally:
            self.explicit = explicit


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \x00")


def read_tags(path: str | Path, tags: tuple[tuple[int, int], ...] = (IMAGE_TYPE, SERIES_UID, COLUMNS, ROWS),
              ) -> dict | None:
    """{tag: value} for those of `tags` (top-level elements: text, or an int for the UL sizes) the header holds, or
    None when the file is not a DICOM file this walk can read. Stops after the last tag asked for: pixel data is
    never reached."""
    last = max(tags)
    try:
        with open(path, "rb") as f:
            head = f.read(132)
            if len(head) < 132 or head[128:] != b"DICM":
                return None
            meta = _Header(f, explicit=True)  # the file meta group is always explicit VR little endian
            syntax = None
            while True:
                start = f.tell()
                tag, vr, length = meta.element()
                if tag[0] != 0x0002:
                    f.seek(start)
                    break
                if tag == (0x0002, 0x0010):
                    syntax = _text(meta.read(length))
                else:
                    meta.skip(length, vr)
            if syntax is None or syntax in _NOT_WALKED:
                return None
            data = _Header(f, explicit=syntax != _IMPLICIT_LE)
            found: dict = {}
            while True:  # a header cut inside an element raises _Unreadable: a truncated file is not a series
                if not f.read(1):
                    return found  # the file ends between elements (one without pixel data, as a DICOMDIR)
                f.seek(-1, 1)
                tag, vr, length = data.element()
                if tag > last or tag == _PIXEL_DATA:
                    return found
                if tag in _NUMBERS and tag in tags and length == 4:
                    found[tag] = struct.unpack("<I", data.read(4))[0]
                elif tag in _NUMBERS:  # a size that is not one UL (empty, two values) is not known: a damaged
                    data.skip(length, vr)  # header, not text to read as a number (it stopped the whole run)
                elif tag in tags and length != _UNDEFINED:
                    found[tag] = _text(data.read(length))
                else:
                    data.skip(length, vr)
    except (OSError, _Unreadable, struct.error):
        return None


def may_be_dicom(path: str | Path) -> bool:
    """Whether a file's name is one a DICOM image has: `.dcm` (any case), no extension (`IM000001`), or a UID's
    digits as one (`1.2.826...4556`); not `DICOMDIR`, a DICOM medium's index. Only such files are looked into."""
    return _dicom_name(os.path.basename(os.fspath(path)))


def _dicom_name(name: str) -> bool:
    dot = name.rfind(".")
    suffix = name[dot:] if 0 < dot < len(name) - 1 else ""  # as pathlib's `suffix`, without a Path per name
    return name.upper() != "DICOMDIR" and (suffix.lower() == ".dcm" or suffix == "" or suffix[1:].isdigit())


def is_dicom_file(path: str | Path) -> bool:
    """A DICOM Part 10 file whatever its name: `DICM` at byte 128. DICOM media name files without an extension
    (`IM000001`), and exports often name them by UID (`1.2.826...4556`), so the name cannot tell."""
    try:
        if not Path(path).is_file():  # a FIFO would block the open
            return False
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def looks_dicom(path: str | Path) -> bool:
    """A file taken for DICOM: a name DICOM files have (`may_be_dicom`), a regular file, and `.dcm` or `DICM` at
    byte 128 (read only for names without `.dcm`)."""
    path = Path(path)
    return may_be_dicom(path) and _is_file(path) and (path.suffix.lower() == ".dcm" or is_dicom_file(path))


def slide_series(files: list[Path]) -> list[tuple[Path, list[tuple[Path, str]]]]:
    """(the file to open, [(file, its kind)] of its series) for each slide among `files` (sorted by name). The kind
    is ImageType's third value in lower case (`volume` for a pyramid level, `label`, `overview`, `thumbnail`),
    or "" when not given. DICOM files of one series are one slide, opened through (and so named after) its
    largest volume file, the base level, wherever that sorts; else its first volume by name (no size stated),
    else its first file. Any other file, or a DICOM file whose series cannot be read, is a slide alone."""
    return _grouped(files)[0]


def _grouped(files: list[Path]) -> tuple[list[tuple[Path, list[tuple[Path, str]]]], list[int]]:
    """`slide_series`, and the positions of its slides that are DICOM series (the others are files alone)."""
    groups: dict[str, list[tuple[Path, str, int]]] = {}
    out: list[tuple[Path, list[tuple[Path, str]]]] = []
    slots: dict[str, int] = {}
    for f in files:
        tags = (read_tags(f) if may_be_dicom(f) and _is_file(f) else None) or {}  # an .svs is not opened
        series = tags.get(SERIES_UID)
        if not series:
            out.append((f, [(f, "")]))
            continue
        values = str(tags.get(IMAGE_TYPE, "")).split("\\")
        kind = values[2].strip().lower() if len(values) > 2 else ""
        area = int(tags.get(COLUMNS, 0)) * int(tags.get(ROWS, 0)) if kind == "volume" else -1
        if series not in groups:
            slots[series] = len(out)
            out.append((f, []))  # placed where its first file lies, so the run's order follows the names
        groups.setdefault(series, []).append((f, kind, area))
    for series, members in groups.items():
        opened = max(members, key=lambda m: m[2])[0]  # max keeps the first of equals: the first by name
        out[slots[series]] = (opened, [(f, kind) for f, kind, _ in members])
    return out, sorted(slots.values())


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in `folder`, by name: `.dcm` (any case), or a name without an extension or
    ending in a UID's digits that holds `DICM` at byte 128."""
    try:
        entries = sorted((f for f in folder.iterdir() if not f.name.startswith(".")), key=lambda f: f.name)
    except OSError:
        return []
    return [f for f in entries if looks_dicom(f)]


def _is_file(f: Path) -> bool:
    try:
        return f.is_file()
    except OSError:  # a folder we may list but not search
        return False


# Folders a cohort run looks at; more than that (a cohort of one folder per series) and the caches below would
# evict each folder before its next slide asks (256 gave 2.5x the header reads above 256 series).
_FOLDERS_CACHED = 16_384


def _folder_series(folder: str) -> tuple[tuple, dict, tuple]:
    """The folder's slides, file name -> its slide's entry (a lookup per file, not a walk of them all), and the
    slides that are DICOM series (their opened file has a series UID)."""
    found, at = _grouped(dicom_files(Path(folder)))
    return tuple(found), {f.name: entry for entry in found for f, _ in entry[1]}, tuple(found[i] for i in at)


# folder -> (its mtime, `_dicom_entries`, `_folder_series`) when last looked at, oldest first
_SEEN: OrderedDict[str, tuple[int, tuple, tuple]] = OrderedDict()


def _indexed(folder: Path) -> tuple[tuple, dict, tuple]:
    """`_folder_series`, read once per process while the folder's DICOM-named files stay; nothing for a folder
    that cannot be read. The files are listed again only when the folder's mtime moves, and the headers read
    again only when those files changed: a run writing its outputs into the folder (`--out` the cohort's own)
    read every header of the folder for each slide."""
    try:
        changed = folder.stat().st_mtime_ns
    except OSError:
        return (), {}, ()
    key = str(folder)
    seen = _SEEN.get(key)
    if seen is None or seen[0] != changed:
        files = _dicom_entries(folder)
        grouped = seen[2] if seen is not None and seen[1] == files else _folder_series(key)
        seen = _SEEN[key] = (changed, files, grouped)
        _SEEN.move_to_end(key)
        while len(_SEEN) > _FOLDERS_CACHED:
            _SEEN.popitem(last=False)
    return seen[2]


def _dicom_entries(folder: Path) -> tuple:
    """(name, inode, size, mtime) of the files in `folder` whose names DICOM files have, sorted: a file added,
    removed or replaced under its name (even on the same inode) counts as a change."""
    out = []
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                if e.name.startswith(".") or not _dicom_name(e.name):
                    continue
                with contextlib.suppress(OSError):
                    if e.is_file():
                        st = e.stat()
                        out.append((e.name, e.inode(), st.st_size, st.st_mtime_ns))
    except OSError:
        return ()
    return tuple(sorted(out))


def folder_series(folder: str | Path) -> list[tuple[Path, list[tuple[Path, str]]]]:
    """`slide_series` of a folder's DICOM files. Read once per process while its DICOM files stay (`_indexed`),
    since a run asks for each slide's series several times: listing a folder of 2,000 files again for every one
    of them took minutes. A file rewritten in place (the folder's mtime unmoved) keeps its series' grouping until
    the next run."""
    return list(_indexed(Path(folder))[0])


def _stamp(f: Path) -> list:
    """A series file as the rerun check compares it: name, size and a sha256 of its first and last 64 KiB, so a
    copy (new times, same bytes) is the same file and a rewritten label is not."""
    h = hashlib.sha256()
    try:
        with open(f, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            h.update(fh.read(_STAMP_BYTES))
            if size > _STAMP_BYTES:
                fh.seek(max(_STAMP_BYTES, size - _STAMP_BYTES))
                h.update(fh.read(_STAMP_BYTES))
    except OSError:
        return [f.name, None, None]
    return [f.name, size, h.hexdigest()[:16]]


def folder_slide(folder: str | Path, slide_suffixes: tuple[str, ...] = ()) -> Path | None:
    """The file a folder holding one DICOM series (as IDC lays slides out: a folder per series) is read
    through, so a table row naming the folder names that slide; None for a file, or a folder holding anything
    else named as a slide (`slide_suffixes`: another slide beside the series makes the folder no one slide). A
    damaged DICOM file beside the series does not: a folder run reports it, as a slide of its own. Decided once
    per process while the folder's entries stay (its mtime): every slide name of a series asks."""
    folder = Path(folder)
    try:
        if not folder.is_dir():
            return None
        changed = folder.stat().st_mtime_ns
    except OSError:
        return None
    return _folder_slide(str(folder), tuple(slide_suffixes), changed)


@functools.lru_cache(maxsize=_FOLDERS_CACHED)
def _folder_slide(folder_text: str, slide_suffixes: tuple[str, ...], _changed_ns: int) -> Path | None:
    folder = Path(folder_text)
    found, _, series = _indexed(folder)  # the headers are read again only when the folder's DICOM files change
    if len(series) != 1:
        return None
    members = {f.name for _, group in found for f, _ in group}  # the damaged ones too: no other slides
    try:
        others = [f for f in folder.iterdir() if f.name not in members and not f.name.startswith(".")]
    except OSError:
        return None
    # an OME-Zarr slide beside it counts; a plain `.zarr` folder (a feature store `extract` wrote there) does not
    if any(f.name.lower().endswith(slide_suffixes) and (_is_file(f) or f.name.lower().endswith(".ome.zarr"))
           for f in others):
        return None
    return series[0][0]


def series_of(path: str | Path) -> tuple[Path, list[tuple[Path, str]]] | None:
    """(the file its slide is opened through, its series' files) for a DICOM file of a series, or None for
    anything else (no DICOM file, a series this walk cannot read)."""
    path = Path(path)
    if not looks_dicom(path):
        return None
    entry = _indexed(path.parent)[1].get(path.name)
    return entry if entry is not None and (read_tags(path) or {}).get(SERIES_UID) else None


def series_slide(path: str | Path) -> Path:
    """The file a run opens for `path`: its series' (`series_of`) for a DICOM file of one, else `path`."""
    found = series_of(path)
    return Path(path) if found is None else found[0]


def series_others(path: str | Path) -> list[Path] | None:
    """The other files of `path`'s DICOM series, for the rerun check (a level or label removed or rewritten beside
    the opened file changes the slide); None when `path` is not one."""
    found = series_of(path)
    return None if found is None else [f for f, _ in found[1] if f.name != Path(path).name]


def files_stamps(files: list[Path]) -> list:
    """[[name, size, content hash], ...] of `files` (`_stamp`: a copy is the same file, a rewrite is not)."""
    return [_stamp(f) for f in files]


def files_times(files: list[Path]) -> list:
    """[[name, size, mtime_ns], ...] of `files`, from the file system alone: when they match a run's record, their
    stamps need no reading."""
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append([f.name, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([f.name, None, None])
    return out


def series_text(members: list[tuple[Path, str]]) -> str:
    """What a series holds, for the line that says its files are read as one slide: `3 volume, 1 label`."""
    counts: dict[str, int] = {}
    for _, kind in members:
        counts[kind or "other"] = counts.get(kind or "other", 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())


def open_failure_hint(path: str | Path) -> str:
    """Why OpenSlide may have failed on a DICOM file, as "; ..." to add to its message, or "" (not DICOM, or
    nothing seen): a header this walk cannot read, or a series whose folder holds no pyramid level."""
    path = Path(path)
    if not is_dicom_file(path):
        return ""
    tags = read_tags(path)
    if tags is None:
        return "; its DICOM header cannot be read (a damaged file, or a big-endian or deflated one)"
    if not tags.get(SERIES_UID):
        return "; its DICOM header names no series: no slide image"
    found = series_of(path)
    if found is not None and not any(kind == "volume" for _, kind in found[1]):
        return (f"; its DICOM series in {path.parent} has no volume (pyramid level) file, only "
                f"{series_text(found[1])}: the image itself is not there")
    return ""
