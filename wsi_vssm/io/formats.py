"""Metadata rules every slide backend shares: content sniffing, the resolution rules (plausible mpp, units,
TIFF resolution tags, the objective-power estimate), channel layout, the range float and signed samples are
read in (`sample_top`), and how to install a missing backend.

It sits below `io.slide` (the dispatcher) and `io.backends.*`, which both import it and nothing of each other.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

from wsi_vssm.io.base import PLAUSIBLE_MPP, tiff_resolution_um, to_rgb  # the range: base's error message needs it
from wsi_vssm.io.errors import MissingBackend, UnsupportedFormat

# How to install what each backend needs; named in MissingBackend messages.
INSTALL = {
    "openslide": "pip install openslide-python openslide-bin",
    "tifffile": "pip install tifffile imagecodecs",
    "imagecodecs": "pip install imagecodecs",
    "zarr": "pip install zarr",
}

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders

# Length units (OME / NGFF spellings) in micrometres.
_UNIT_UM = {  # OME's length symbols and NGFF's unit names (ImageJ writes "micron")
    "micrometer": 1.0, "micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "μm": 1.0,
    "nanometer": 1e-3, "nm": 1e-3,
    "angstrom": 1e-4, "å": 1e-4,
    "picometer": 1e-6, "pm": 1e-6,
    "millimeter": 1e3, "mm": 1e3,
    "centimeter": 1e4, "cm": 1e4,
    "decimeter": 1e5, "dm": 1e5,
    "meter": 1e6, "m": 1e6,
    "inch": 25400.0, "in": 25400.0,
}  # fmt: skip


def is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in TIFF_MAGIC
    except OSError:
        return False


# TIFF tags that locate pixel data: (offsets, byte counts, what they hold), and SubIFDs (OME pyramids)
_DATA_TAGS = ((324, 325, "tile"), (273, 279, "strip"))
_SUBIFDS = 330
_INT_TYPES = {1: "u1", 3: "u2", 4: "u4", 13: "u4", 16: "u8", 18: "u8"}  # BYTE SHORT LONG IFD LONG8 IFD8
_MAX_IFDS = 10_000  # a loop in a damaged directory chain ends here


class _EndsEarly(Exception):
    """Raised inside `tiff_truncation` with what lies beyond the end of the file."""


class _TooFewChunks(Exception):
    """Raised inside `tiff_truncation` when a directory lists fewer tiles or strips than its size needs."""


def tiff_truncation(path: str | os.PathLike) -> str | None:
    """'the file is truncated (...)' when a TIFF ends before one of its image directories, offset tables, tiles
    or strips does (a partial copy or download), 'damaged TIFF directory: ...' when a directory lists fewer tiles
    or strips than its stated size needs (the readers would show the missing ones as white background, so a
    damaged header read as "no tissue"); None when all is in place, or it is no TIFF.

    Cheap: reads only the directories and their offset tables (a few MB for a 200,000 px slide), no pixels. Run
    when a TIFF is opened, so that a cut file fails at once with one line that says so, whichever backend reads
    it, instead of a decoder's error on the first missing tile.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            _walk_tiff(f, size)
    except _EndsEarly as e:
        return f"the file is truncated ({e}, file is {size} bytes)"
    except _TooFewChunks as e:
        return f"damaged TIFF directory: {e}"
    except (OSError, ValueError):  # unreadable or not a TIFF: the backends say what is wrong
        return None
    return None


def _walk_tiff(f, size: int) -> None:
    """Every image directory of the TIFF in `f` (the main chain and SubIFDs); _EndsEarly past `size` bytes."""
    import struct

    head = f.read(16)
    if head[:4] not in TIFF_MAGIC:
        raise ValueError("not a TIFF")
    order = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\x00", b"\x00+")
    entry = struct.Struct(order + ("HHQ8s" if big else "HHI4s"))  # tag, type, count, value or its offset
    count_fmt, next_fmt = order + ("Q" if big else "H"), order + ("Q" if big else "I")
    todo = [struct.unpack(next_fmt, head[8:16] if big else head[4:8])[0]]
    seen: set[int] = set()
    while todo and len(seen) < _MAX_IFDS:
        at = todo.pop()
        if at == 0 or at in seen:
            continue
        seen.add(at)
        n = struct.unpack(count_fmt, _read(f, size, at, struct.calcsize(count_fmt), "an image directory"))[0]
        body = _read(f, size, f.tell(), n * entry.size + struct.calcsize(next_fmt), "an image directory")
        tags = {}
        for i in range(n):
            tag, typ, count, value = entry.unpack_from(body, i * entry.size)
            tags[tag] = (typ, count, value)
        todo.append(struct.unpack_from(next_fmt, body, n * entry.size)[0])
        for offsets_tag, counts_tag, kind in _DATA_TAGS:
            if offsets_tag in tags and counts_tag in tags:
                offsets = _ints(f, size, order, tags[offsets_tag])
                counts = _ints(f, size, order, tags[counts_tag])
                k = min(len(offsets), len(counts))
                ends = offsets[:k] + counts[:k]
                ends = ends[counts[:k] > 0]  # sparse tiles (count 0) have no data
                if ends.size and int(ends.max()) > size:
                    raise _EndsEarly(f"{kind} data ends at byte {int(ends.max())}")
                _check_chunk_count(f, size, order, tags, kind, len(offsets), at)
        if _SUBIFDS in tags:
            todo.extend(int(v) for v in _ints(f, size, order, tags[_SUBIFDS]))


def _check_chunk_count(f, size: int, order: str, tags: dict, kind: str, listed: int, at: int) -> None:
    """_TooFewChunks when the directory at byte `at` lists fewer tiles or strips than its width and height need."""

    def first(tag: int, default: int | None = None) -> int | None:
        values = _ints(f, size, order, tags[tag]) if tag in tags else None
        return int(values[0]) if values is not None and values.size else default

    width, height = first(256), first(257)
    if not width or not height or 32997 in tags:  # no size (the backends say so) or 3-D tiles (ImageDepth)
        return
    planes = first(277, 1) if first(284, 1) == 2 else 1  # separate planes: one set of chunks per sample
    if kind == "tile":
        tw, th = first(322), first(323)
        if not tw or not th:
            return
        needed = math.ceil(width / tw) * math.ceil(height / th) * planes
    else:
        needed = math.ceil(height / min(first(278, height) or height, height)) * planes
    if listed < needed:
        raise _TooFewChunks(f"the image directory at byte {at} says {width:,} x {height:,} px, which needs "
                            f"{needed:,} {kind}s, but lists {listed:,}")


def _read(f, size: int, at: int, n: int, what: str) -> bytes:
    if at + n > size:
        raise _EndsEarly(f"{what} ends at byte {at + n}")
    f.seek(at)
    return f.read(n)


def _ints(f, size: int, order: str, field: tuple[int, int, bytes]) -> np.ndarray:
    """A tag's integer values (inline, or from where its value field points) as uint64."""
    typ, count, value = field
    dtype = np.dtype(_INT_TYPES.get(typ, "u4")).newbyteorder(order)
    n = count * dtype.itemsize
    if n <= len(value):
        raw = value[:n]
    else:
        raw = _read(f, size, int.from_bytes(value, "little" if order == "<" else "big"), n, "an offset table")
    return np.frombuffer(raw, dtype).astype(np.uint64)


def is_zarr_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in ("zarr.json", ".zattrs", ".zgroup"))


def is_zarr_array_dir(path: Path) -> bool:
    """One array of a zarr store (v2 `.zarray`, v3 `zarr.json` of node type array): a pyramid level, not an
    image."""
    if (path / ".zarray").is_file():
        return True
    try:
        return json.loads((path / "zarr.json").read_text(encoding="utf-8")).get("node_type") == "array"
    except (OSError, ValueError, AttributeError):
        return False


def module_available(name: str) -> bool:
    try:
        importlib.import_module(name)
    except (ImportError, OSError):  # OSError: a wrapper whose native library fails to load
        return False
    return True


def missing_backend(path: str | os.PathLike | None, library: str, why: str = "") -> MissingBackend:
    why = f" ({why})" if why else ""
    return MissingBackend(path, f"{library} is not installed{why}; install it with: {INSTALL[library]}")


# ---- resolution rules shared by the backends --------------------------------------------------------------


def plausible_mpp(value: object) -> float | None:
    """`value` as microns per pixel if it is a number a microscope scan could have, else None."""
    try:
        mpp = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not math.isfinite(mpp) or not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        return None
    return mpp


def length_to_um(value: object, unit: str | None) -> float | None:
    """A physical length in a named unit (OME / NGFF spelling) as micrometres; None if either is unusable."""
    if unit is None:
        return None
    factor = _UNIT_UM.get(str(unit).strip().lower()) or _UNIT_UM.get(str(unit).strip())
    if factor is None:
        return None
    try:
        return float(value) * factor  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def mpp_from_tiff_resolution(resolution: object, unit: object) -> float | None:
    """Microns per pixel from a TIFF XResolution (pixels per unit) and ResolutionUnit (2 inch, 3 cm; tifffile
    also writes 4 mm and 5 um).

    Unit NONE (1) or missing means the numbers carry no physical meaning.
    """
    return plausible_mpp(tiff_resolution_um(resolution, unit))


def mpp_from_objective(power: object) -> float | None:
    """The usual rule of thumb: 10 / objective power (40x ~ 0.25 um/px, 20x ~ 0.5)."""
    try:
        p = float(power)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(p) and p > 0):
        return None
    return plausible_mpp(10.0 / p)


_PLANE_AXES = {"T": "time points", "Z": "focal planes", "I": "pages", "Q": "pages"}  # tifffile's / NGFF's names


def unread_planes(axes: str, shape) -> str | None:
    """What `channels_to_rgb` and the readers leave out of an image of these axes and shape ('7 channels: only
    the first 3 are read'; '3 pages: only the first is read'), or None when every pixel value is read."""
    notes = []
    for axis, n in zip(axes.upper(), shape, strict=True):
        if axis in "YXS" or n <= 1:
            continue
        if axis == "C":
            if n != 3:
                notes.append(f"{n} channels: only the first {'one is' if n == 2 else '3 are'} read")
        else:
            notes.append(f"{n} {_PLANE_AXES.get(axis, f'planes along axis {axis}')}: only the first is read")
    return "; ".join(notes) or None


def warn_unread_planes(path, axes: str, shape) -> None:
    """The backends' one warning when an image holds more than they read (`unread_planes`)."""
    unread = unread_planes(axes, shape)
    if unread:
        warnings.warn(f"{path}: {unread}", stacklevel=3)


def warn_non_square(path, props: dict, mpp_x: float | None, mpp_y: float | None) -> None:
    """The backends' one warning for pixels that are not square (rare): the x size is read as both, as
    OpenSlide-based tools do, so the image is stretched or squashed in y; `props` records both sizes."""
    if mpp_x is None or mpp_y is None or math.isclose(mpp_x, mpp_y, rel_tol=0.02):
        return
    props["wsi_vssm.non-square-pixels"] = f"{mpp_x:.6g} x {mpp_y:.6g}"
    warnings.warn(f"{path}: pixels are not square ({mpp_x:.4g} x {mpp_y:.4g} um): read as {mpp_x:.4g} um square, "
                  "so its shapes are distorted in y; resample it to square pixels for a true picture", stacklevel=3)


# ---- sample values: which one is full intensity -----------------------------------------------------------

_TOPS = (1.0, 255.0, 65535.0)  # the ranges float (and signed) samples are read in: the first that holds them
PEEK_PX = 1024  # the sample range is looked up in at most this many pixels a side of the coarsest level
PEEK_GRID = 4  # a larger level: PEEK_GRID x PEEK_GRID windows spread over it, as many pixels in all


def peek_windows(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) windows of a `width` x `height` level to look up its sample range in: the whole level up to
    PEEK_PX a side, else a grid of small windows spread over it (a blank or padded corner, common on single-level
    scans, alone would say nothing of the tissue's range)."""
    if width <= PEEK_PX and height <= PEEK_PX:
        return [(0, 0, width, height)]
    w, h = min(width, PEEK_PX // PEEK_GRID), min(height, PEEK_PX // PEEK_GRID)
    xs = np.linspace(0, width - w, PEEK_GRID).round().astype(int)
    ys = np.linspace(0, height - h, PEEK_GRID).round().astype(int)
    return sorted({(int(x), int(y), w, h) for y in ys for x in xs})


def needs_range(dtype) -> bool:
    """Whether samples of `dtype` (float, signed integer) need their range to be read: unsigned ones need not."""
    return np.dtype(dtype).kind in "fi"


def sample_range(*samples: np.ndarray) -> tuple[float, float]:
    """(min, max) of the finite values in all of `samples`; (0, 0) when there are none."""
    a = np.concatenate([np.asarray(s).ravel() for s in samples])
    if a.dtype.kind == "f":
        a = a[np.isfinite(a)]
    return (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)


def sample_top(path, dtype, lo: float, hi: float) -> float:
    """The value of `dtype` samples (float or signed integer) in the range `lo`..`hi` that reads as 255.

    The first of 0-1 (floats only), 0-255, 0-65535 and a signed type's positive range whose top is more than
    half `hi` (an overshoot from resampling stays in its range; an image so dark that it is not is black
    either way). UnsupportedFormat for samples beyond 131,070 (floats) and for negative ones past a tenth of
    `hi`: signed data (differences, normalised values) is no RGB image. Smaller negatives clip to 0.
    """
    dtype = np.dtype(dtype)
    tops = list(_TOPS)
    if dtype.kind == "i":
        most = float(np.iinfo(dtype).max)
        tops = [t for t in _TOPS[1:] if t < most] + [most]
    what = f"{dtype.name} samples from {lo:,.6g} to {hi:,.6g}"
    if lo < 0 and -lo > max(hi, 0.0) / 10:
        raise UnsupportedFormat(path, f"{what}: signed data, not an RGB image; convert it to 8-bit RGB")
    top = next((t for t in tops if hi < 2 * t), None)
    if top is None:
        raise UnsupportedFormat(path, f"{what}: not in 0-1, 0-255 or 0-65535; convert it to 8-bit RGB")
    return top


def scale_to_uint8(samples: np.ndarray, top: float) -> np.ndarray:
    """Samples in 0..`top` as uint8 0..255: below 0 and -inf read 0, above `top`, +inf and NaN 255 (white, as
    missing tiles)."""
    a = np.nan_to_num(np.asarray(samples, np.float32), nan=top, posinf=top, neginf=0.0)
    return (np.clip(a, 0.0, top) * np.float32(255.0 / top) + np.float32(0.5)).astype(np.uint8)


def channels_to_rgb(tile: np.ndarray, samples: bool = True, top: float | None = None) -> np.ndarray:
    """An H x W (x C) tile as H x W x 3 uint8; `top`: the sample value that reads as 255 (`sample_top`), else
    uint8 as it is and other types over their whole range.

    samples=True: the channels are a pixel's samples (gray, gray+alpha, RGB, RGBA): alpha composes over white.
    samples=False: independent channels (fluorescence, OME/NGFF 'c'): one is shown as gray, three or more as
    the first three, and two as the first alone (a second channel is not an alpha).
    """
    if tile.ndim == 3 and not samples:
        c = tile.shape[2]
        tile = tile[..., :3] if c >= 3 else tile[..., :1]
    return to_rgb(tile if top is None else scale_to_uint8(tile, top))
