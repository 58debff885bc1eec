"""Opening slides: `open_slide` picks a backend by content, and the metadata rules every backend shares.

Backends live one per file in `wsi_vssm/io/backends/` and import their library lazily, so importing this
module costs nothing beyond the standard library and numpy. A backend's constructor reads metadata only;
`open_slide` then applies the resolution rules that are the same everywhere (the objective-power estimate and
its warning, a user's `mpp=`).
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from enum import Enum
from pathlib import Path

import numpy as np

from wsi_vssm.errors import UsageError
from wsi_vssm.io.base import SlideReader, to_rgb
from wsi_vssm.io.errors import CorruptSlide, MissingBackend, SlideError, UnsupportedFormat


class SlideBackend(str, Enum):
    AUTO = "auto"
    OPENSLIDE = "openslide"
    TIFFFILE = "tifffile"
    ZARR = "zarr"


BACKEND_NAMES = tuple(b.value for b in SlideBackend)

# How to install what each backend needs; named in MissingBackend messages.
INSTALL = {
    "openslide": "pip install openslide-python openslide-bin",
    "tifffile": "pip install tifffile imagecodecs",
    "imagecodecs": "pip install imagecodecs",
    "zarr": "pip install zarr",
}

# Formats only OpenSlide reads here (no TIFF container tifffile could fall back to).
OPENSLIDE_ONLY_SUFFIXES = (".dcm", ".mrxs", ".vms", ".vmu", ".svslide")

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders

# Microns per pixel a microscope scan can plausibly have at level 0. Outside it a resolution is a writer's
# default (72 dpi = 352.8 um/px, 300 dpi = 84.7 um/px), not a measurement, and is treated as absent.
PLAUSIBLE_MPP = (0.01, 20.0)

# Length units (OME / NGFF spellings) in micrometres.
_UNIT_UM = {
    "micrometer": 1.0, "micron": 1.0, "um": 1.0, "µm": 1.0, "μm": 1.0,
    "nanometer": 1e-3, "nm": 1e-3,
    "angstrom": 1e-4, "å": 1e-4,
    "millimeter": 1e3, "mm": 1e3,
    "centimeter": 1e4, "cm": 1e4,
    "meter": 1e6, "m": 1e6,
    "inch": 25400.0, "in": 25400.0,
}  # fmt: skip


def open_slide(
    path: str | os.PathLike, backend: str | SlideBackend = "auto", mpp: float | None = None
) -> SlideReader:
    """Open a whole-slide image.

    backend: "auto" (by content: OpenSlide when it reads the file and is installed, else tifffile;
    OME-Zarr for a directory with zarr metadata), or "openslide", "tifffile", "zarr".
    mpp: microns per pixel at level 0 for files that state none; overrides (with a warning) a stated one.
    Raises UnsupportedFormat, CorruptSlide, MissingBackend (all SlideError), or UsageError for a bad
    `backend` or `mpp`.
    """
    name = _backend_name(backend)
    if mpp is not None:
        mpp = _user_mpp(mpp)
    p = Path(path)
    if not p.exists():
        raise UnsupportedFormat(p, "no such file or directory")
    reader = _open_auto(p) if name == "auto" else _open_with(name, p)
    _settle_mpp(reader, mpp)
    return reader


def _user_mpp(mpp: object) -> float:
    try:
        value = float(mpp)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"mpp must be a positive number of microns per pixel, got {mpp!r}")
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
        if is_zarr_dir(path):
            return _open_with("zarr", path)
        raise UnsupportedFormat(path, "a directory, but not an OME-Zarr store (no .zattrs or zarr.json)")
    head = _read_head(path)
    is_tiff = head[:4] in _TIFF_MAGIC
    if is_tiff and _is_ome_tiff(path):
        # OpenSlide (4.x) reads OME-TIFF as a plain TIFF: no SubIFD pyramid, no OME resolution.
        return _open_with("tifffile", path)
    openslide_error: SlideError | None = None
    if module_available("openslide") and _openslide_detects(path):
        try:
            return _open_with("openslide", path)
        except (CorruptSlide, UnsupportedFormat) as err:
            if not is_tiff:
                raise
            openslide_error = err  # tifffile may still read a TIFF that OpenSlide rejects
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
        kind = "DICOM" if is_dicom else path.suffix.lower()
        raise UnsupportedFormat(path, f"OpenSlide does not recognise this {kind} file")
    if not head:
        raise UnsupportedFormat(path, "empty file")
    raise UnsupportedFormat(path, f"not a slide format this app reads (file starts with {head[:8]!r})")


def is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _read_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(132)
    except OSError as err:
        raise UnsupportedFormat(path, f"cannot read the file: {err.strerror or err}") from err


def _is_ome_tiff(path: Path) -> bool:
    if not module_available("tifffile"):
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            return bool(tf.is_ome)
    except Exception:  # any failure here just means "not a readable OME-TIFF"
        return False


def _openslide_detects(path: Path) -> bool:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(os.fspath(path)) is not None
    except (openslide.OpenSlideError, OSError, ValueError):  # detection failing: OpenSlide cannot read it
        return False


def is_zarr_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in ("zarr.json", ".zattrs", ".zgroup"))


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
    """Microns per pixel from a TIFF XResolution (pixels per unit) and ResolutionUnit (2 inch, 3 cm).

    Unit NONE (1) or missing means the numbers carry no physical meaning.
    """
    per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit) if isinstance(unit, int) else -1)
    if per_unit is None:
        return None
    try:
        if isinstance(resolution, tuple):
            num, den = resolution
            pixels = float(num) / float(den)
        else:
            pixels = float(resolution)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not pixels > 0:
        return None
    return plausible_mpp(per_unit / pixels)


def mpp_from_objective(power: object) -> float | None:
    """The usual rule of thumb: 10 / objective power (40x ~ 0.25 um/px, 20x ~ 0.5)."""
    try:
        p = float(power)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(p) and p > 0):
        return None
    return plausible_mpp(10.0 / p)


def channels_to_rgb(tile: np.ndarray, samples: bool = True) -> np.ndarray:
    """An H x W (x C) tile as H x W x 3 uint8.

    samples=True: the channels are a pixel's samples (gray, gray+alpha, RGB, RGBA): alpha composes over white.
    samples=False: independent channels (fluorescence, OME/NGFF 'c'): one is shown as gray, three or more as
    the first three, and two as the first alone (a second channel is not an alpha).
    """
    if tile.ndim == 3 and not samples:
        c = tile.shape[2]
        tile = tile[..., :3] if c >= 3 else tile[..., :1]
    return to_rgb(tile)


def _settle_mpp(reader: SlideReader, mpp: float | None) -> None:
    if mpp is not None:
        if reader.mpp is not None and reader.mpp_source != "objective-power":
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
            "objective (10 / power); pass mpp= (--mpp) if that is wrong",
            stacklevel=3,
        )
