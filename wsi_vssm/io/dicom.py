"""DICOM WSI series in a folder. A DICOM slide is a series of files (one per pyramid level, plus label, overview
and thumbnail images), and OpenSlide reads the whole series from any one of them. So a folder of slides
holds one slide per series, not per file: `slide_series` groups the files by SeriesInstanceUID.

The two tags needed are read by walking the file's header (standard library only, and no pixel data read):
a Part 10 file (`DICM` at byte 128) in explicit or implicit VR little endian. Anything else (big endian,
deflated, no preamble, a damaged header) gives None, and that file is kept as a slide of its own, so the
reader says what is wrong with it."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

SERIES_UID = (0x0020, 0x000E)
IMAGE_TYPE = (0x0008, 0x0008)
_PIXEL_DATA = (0x7FE0, 0x0010)
_ITEM, _ITEM_END, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
_UNDEFINED = 0xFFFFFFFF
# explicit VRs whose length takes 4 bytes after 2 reserved ones (PS3.5 7.1.2)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_IMPLICIT_LE = "1.2.840.10008.1.2"
_NOT_WALKED = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # explicit big endian, deflated
_MAX_HEADER = 64 << 20  # a header longer than this is not a slide's: give up rather than read on
_MAX_DEPTH = 32


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

    def element(self) -> tuple[tuple[int, int], int]:
        """The next element's tag and value length (0xFFFFFFFF: undefined), the file left at its value."""
        group, elem = struct.unpack("<HH", self.read(4))
        if group == 0xFFFE or not self.explicit:  # items and delimiters never carry a VR
            return (group, elem), struct.unpack("<I", self.read(4))[0]
        vr = self.read(2)
        if vr in _LONG_VRS:
            self.read(2)
            return (group, elem), struct.unpack("<I", self.read(4))[0]
        return (group, elem), struct.unpack("<H", self.read(2))[0]

    def skip(self, length: int, depth: int = 0) -> None:
        """Past a value: `length` bytes, or an undefined-length sequence (or encapsulated data) item by item."""
        if length != _UNDEFINED:
            self.f.seek(length, 1)
            return
        if depth > _MAX_DEPTH:  # a damaged file could nest without end; real headers nest a few levels
            raise _Unreadable
        while True:
            tag, item_length = self.element()
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM:
                raise _Unreadable
            if item_length != _UNDEFINED:
                self.f.seek(item_length, 1)
                continue
            while True:  # an item of undefined length: its elements up to the item delimiter
                inner, inner_length = self.element()
                if inner == _ITEM_END:
                    break
                self.skip(inner_length, depth + 1)


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \x00")


def read_tags(path: str | Path, tags: tuple[tuple[int, int], ...] = (IMAGE_TYPE, SERIES_UID)) -> dict | None:
    """{tag: text value} for those of `tags` (top-level text elements) the header holds, or None when the file is
    not a DICOM file this walk can read. Stops at the last tag asked for: pixel data is never reached."""
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
                tag, length = meta.element()
                if tag[0] != 0x0002:
                    f.seek(start)
                    break
                if tag == (0x0002, 0x0010):
                    syntax = _text(meta.read(length))
                else:
                    meta.skip(length)
            if syntax is None or syntax in _NOT_WALKED:
                return None
            data = _Header(f, explicit=syntax != _IMPLICIT_LE)
            found: dict = {}
            while True:
                try:
                    tag, length = data.element()
                except _Unreadable:
                    return found  # the header ended (a file of header alone): what it held
                if tag > last or tag == _PIXEL_DATA:
                    return found
                if tag in tags and length != _UNDEFINED:
                    found[tag] = _text(data.read(length))
                else:
                    data.skip(length)
    except (OSError, _Unreadable, struct.error):
        return None


def is_dicom_file(path: str | Path) -> bool:
    """A DICOM Part 10 file whatever its name: `DICM` at byte 128. DICOM media name files without an extension
    (`IM000001`), and exports often name them by UID (`1.2.826...4556`), so the name cannot tell."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def slide_series(files: list[Path]) -> list[tuple[Path, list[tuple[Path, str]]]]:
    """(the file to open, [(file, its kind)] of its series) for each slide among `files` (sorted by name). The kind
    is ImageType's third value in lower case (`volume` for a pyramid level, `label`, `overview`, `thumbnail`),
    or "" when not given. DICOM files of one series are one slide, opened through its first volume file by
    name, else its first file; any other file, or a DICOM file whose series cannot be read, is a slide alone."""
    groups: dict[str, list[tuple[Path, str]]] = {}
    out: list[tuple[Path, list[tuple[Path, str]]]] = []
    slots: dict[str, int] = {}
    for f in files:
        tags = read_tags(f) if f.is_file() else None  # 132 bytes read from any other file: cheap
        series = (tags or {}).get(SERIES_UID)
        if not series:
            out.append((f, [(f, "")]))
            continue
        values = (tags or {}).get(IMAGE_TYPE, "").split("\\")
        kind = values[2].strip().lower() if len(values) > 2 else ""
        if series not in groups:
            slots[series] = len(out)
            out.append((f, []))  # placed where its first file lies, so the run's order follows the names
        groups.setdefault(series, []).append((f, kind))
    for series, members in groups.items():
        opened = next((f for f, kind in members if kind == "volume"), members[0][0])
        out[slots[series]] = (opened, members)
    return out


def series_text(members: list[tuple[Path, str]]) -> str:
    """What a series holds, for the line that says its files are read as one slide: `3 volume, 1 label`."""
    counts: dict[str, int] = {}
    for _, kind in members:
        counts[kind or "other"] = counts.get(kind or "other", 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())
