"""Opening slides: `open_slide` picks a backend by content and settles the resolution.

Backends live one per file in `wsi_vssm/io/backends/` and import their library lazily, so importing this
module costs nothing beyond the standard library and numpy. The metadata rules every backend shares live in
`io.formats`. A backend's constructor reads metadata only; `open_slide` then applies the resolution rules that
are the same everywhere (the objective-power estimate and its warning, a user's `mpp=`).
"""

from __future__ import annotations

import errno
import math
import os
import stat
import warnings
from enum import Enum
from pathlib import Path

from wsi_vssm.errors import UsageError
from wsi_vssm.io.base import SlideReader
from wsi_vssm.io.errors import CorruptSlide, MissingBackend, SlideError, UnsupportedFormat
from wsi_vssm.io.formats import TIFF_MAGIC, is_zarr_array_dir, is_zarr_dir, missing_backend, module_available


class SlideBackend(str, Enum):
    AUTO = "auto"
    OPENSLIDE = "openslide"
    TIFFFILE = "tifffile"
    ZARR = "zarr"


BACKEND_NAMES = tuple(b.value for b in SlideBackend)

# Formats only OpenSlide reads here (no TIFF container tifffile could fall back to).
OPENSLIDE_ONLY_SUFFIXES = (".dcm", ".mrxs", ".vms", ".vmu", ".svslide")




def open_slide(
    path: str | os.PathLike, backend: str | SlideBackend = "auto", mpp: float | None = None,
    fallback_mpp: float | None = None,
) -> SlideReader:
    """Open a whole-slide image.

    backend: "auto" (by content: OpenSlide when it reads the file and is installed, else tifffile;
    OME-Zarr for a directory with zarr metadata), or "openslide", "tifffile", "zarr".
    mpp: microns per pixel at level 0 for files that state none; overrides (with a warning) a stated one.
    fallback_mpp: microns per pixel at level 0 for files that store none (also in place of an estimate from the
    objective power); a stated one is kept. Its source is then "fallback". `mpp` wins over it.
    Raises UnsupportedFormat, CorruptSlide, MissingBackend (all SlideError), or UsageError for a bad
    `backend` or `mpp`.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"open_slide takes a path, got a {type(path).__name__}; wrap an image in memory in "
                         "ArraySlide(image, mpp=...)")
    name = _backend_name(backend)
    mpp = None if mpp is None else _user_mpp(mpp)
    fallback_mpp = None if fallback_mpp is None else _user_mpp(fallback_mpp, "fallback_mpp")
    p = Path(path)
    problem = path_problem(p)
    if problem is not None:
        raise UnsupportedFormat(p, problem)
    reader = _open_auto(p) if name == "auto" else _open_with(name, p)
    _settle_mpp(reader, mpp, fallback_mpp)
    return reader


def reopen_slide(slide: SlideReader) -> SlideReader:
    """A second reader of `slide`'s file with the same backend and the same mpp and mpp source, without the
    warnings opening it first gave (worker threads each need their own handle: tifffile and zarr handles are
    not thread-safe)."""
    if slide.path is None:
        raise UsageError("only a slide opened from a file can be reopened")
    reader = _open_with(_backend_name(slide.backend), Path(slide.path))
    if slide.mpp is not None:
        reader.set_mpp(slide.mpp, slide.mpp_source)
    return reader


_SPECIAL_FILES = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def path_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be a slide before anything reads it ('no such file or directory', 'a loop of symbolic
    links', 'not a regular file: a named pipe (FIFO)'), or None for a file or folder. Reading a pipe would wait
    for a writer forever, so it is refused here rather than opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a loop of symbolic links"
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)})"
        if err.errno == errno.ENOENT:
            return "no such file or directory"
        return (err.strerror or str(err)).lower()
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "a special file")
    return f"not a regular file: {kind}"


def _user_mpp(mpp: object, name: str = "mpp") -> float:
    try:
        value = float(mpp)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{name} must be a positive number of microns per pixel, got {mpp!r}")
    return value


def _backend_name(backend: str | SlideBackend) -> str:
    try:
        return SlideBackend(backend).value
    except ValueError:
        raise UsageError(
            f"unknown slide backend {backend!r}; choose one of: {', '.join(BACKEND_NAMES)}"
        ) from None


def _open_with(name: str, path: Path) -> SlideReader:
    if name == "openslide":
        from wsi_vssm.io.backends.openslide_backend import OpenSlideSlide

        return OpenSlideSlide(path)
    if name == "tifffile":
        from wsi_vssm.io.backends.tiff_backend import TiffSlide

        return TiffSlide(path)
    from wsi_vssm.io.backends.zarr_backend import ZarrSlide

    return ZarrSlide(path)


def _open_auto(path: Path) -> SlideReader:
    """Choose by content: a zarr directory, a TIFF, a DICOM file, or whatever OpenSlide recognises."""
    if path.is_dir():
        if is_zarr_dir(path) or is_zarr_array_dir(path):  # an array alone: the zarr backend says what to give
            return _open_with("zarr", path)
        raise UnsupportedFormat(path, "a directory, but not an OME-Zarr store (no .zattrs or zarr.json)")
    head = _read_head(path)
    is_tiff = head[:4] in TIFF_MAGIC
    if is_tiff and _tifffile_first(path):
        return _open_with("tifffile", path)
    openslide_error: SlideError | None = None
    if module_available("openslide") and _openslide_detects(path):
        try:
            reader = _open_with("openslide", path)
        except (CorruptSlide, UnsupportedFormat) as err:
            if not is_tiff:
                raise
            openslide_error = err  # tifffile may still read a TIFF that OpenSlide rejects
        else:
            if not (is_tiff and _huge_flat_tiff(reader)):
                return reader
            try:  # see _huge_flat_tiff: tifffile reads the same pixels, several times faster
                flat = _open_with("tifffile", path)
            except SlideError:
                return reader  # OpenSlide reads it too, only slower
            reader.close()
            return flat
    if is_tiff:
        try:
            return _open_with("tifffile", path)
        except MissingBackend:
            if openslide_error is not None:
                raise openslide_error from None
            raise
    is_dicom = head[128:132] == b"DICM"
    if is_dicom or path.suffix.lower() in OPENSLIDE_ONLY_SUFFIXES:
        if not module_available("openslide"):
            raise missing_backend(path, "openslide", "needed for this format")
        from wsi_vssm.io.dicom import open_failure_hint

        kind = "DICOM" if is_dicom else path.suffix.lower()
        raise UnsupportedFormat(path, f"OpenSlide does not recognise this {kind} file{open_failure_hint(path)}")
    if not head:
        raise UnsupportedFormat(path, "empty file")
    if head[:4] == b"PK\x03\x04":
        raise UnsupportedFormat(path, "a ZIP archive: unpack it first (a zipped OME-Zarr store is read unpacked)")
    raise UnsupportedFormat(path, f"not a slide format this app reads (file starts with {_shown(head[:8])})")


def _shown(head: bytes) -> str:
    """A file's first bytes for a message: printable ASCII as text, the rest as hex (`IJrE` or `00 ff 1a`)."""
    if head and all(32 <= b < 127 for b in head):
        return f"'{head.decode('ascii')}'"
    return " ".join(f"{b:02x}" for b in head) or "nothing: it is empty"


def _huge_flat_tiff(reader: SlideReader) -> bool:
    """A plain TIFF with one huge level (no pyramid): its thumbnail decodes every tile. tifffile hands those tiles
    out as they decode (`SlideReader._map_tiles`); OpenSlide reads it block by block about four times slower
    (a 20,000 px thumbnail on 2 busy cores: 31 s against 7 s)."""
    w, h = reader.dimensions
    return reader.vendor == "generic-tiff" and reader.level_count == 1 and w * h > reader.thumbnail_read_limit


def _read_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(132)
    except OSError as err:
        raise UnsupportedFormat(path, f"cannot read the file: {err.strerror or err}") from err


def _tifffile_first(path: Path) -> bool:
    """An OME-TIFF (OpenSlide 4.x reads it as a plain TIFF: no SubIFD pyramid, no OME resolution), float or
    signed samples (OpenSlide fails on floats and wraps signed values; tifffile reads them in their range), or a
    plain TIFF whose pyramid OpenSlide does not see (`_pyramid_openslide_misses`)."""
    if not module_available("tifffile"):
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            dtype = getattr(tf.pages.first, "dtype", None)
            return bool(tf.is_ome) or (dtype is not None and dtype.kind in "fi") or _pyramid_openslide_misses(tf)
    except Exception:  # any failure here just means "not a TIFF tifffile reads better"
        return False


_VENDOR_TIFFS = ("is_svs", "is_ndpi", "is_scn", "is_philips", "is_bif", "is_qpi")  # OpenSlide reads their levels


def _pyramid_openslide_misses(tf) -> bool:
    """A plain TIFF whose reduced levels OpenSlide does not see, so it would read every region and thumbnail from
    the full-size level (30 times slower on a 6,000 px 40x file): levels stored as SubIFDs without OME metadata
    (libvips `--subifd`, tifffile's default), or pages tifffile's own metadata groups into a pyramid without the
    reduced-image flag OpenSlide looks for."""
    levels = max(tf.series, key=lambda s: math.prod(s.shape)).levels if tf.series else []
    if len(levels) < 2 or any(getattr(tf, flag, False) for flag in _VENDOR_TIFFS):
        return False
    reduced = levels[1].keyframe
    return reduced.offset not in {page.offset for page in tf.pages} or not reduced.is_reduced


def _openslide_detects(path: Path) -> bool:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(os.fspath(path)) is not None
    except (openslide.OpenSlideError, OSError, ValueError):  # detection failing: OpenSlide cannot read it
        return False


SAME_MPP = 0.005  # a given mpp within this fraction of the stated one agrees with it: no override warning


def _settle_mpp(reader: SlideReader, mpp: float | None, fallback_mpp: float | None = None) -> None:
    if mpp is None and fallback_mpp is not None and (reader.mpp is None or reader.mpp_source == "objective-power"):
        reader.set_mpp(fallback_mpp, "fallback")  # the user's value for files that store none: no warning
    elif mpp is not None:
        stated = reader.mpp is not None and reader.mpp_source != "objective-power"
        # the same value given again (a slide list's mpp column filled from the files, say) is no override
        if stated and abs(reader.mpp - mpp) > SAME_MPP * mpp:
            warnings.warn(
                f"{reader.path}: the file states {reader.mpp:.4g} um/px ({reader.mpp_source}); "
                f"using the given {mpp:.4g} um/px instead",
                stacklevel=3,
            )
        reader.set_mpp(mpp, "user")
    elif reader.mpp_source == "objective-power":
        power = getattr(reader, "objective_power", None)
        warnings.warn(
            f"{reader.path}: no resolution stored; estimated {reader.mpp:.3g} um/px from the {power:g}x "
            "objective (10 / power); pass mpp= (--mpp, or --fallback-mpp for a folder) if that is wrong",
            stacklevel=3,
        )
