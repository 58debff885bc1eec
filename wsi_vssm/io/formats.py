"""Metadata rules every slide backend shares: content sniffing, the resolution rules (plausible mpp, units,
TIFF resolution tags, the objective-power estimate), channel layout, and how to install a missing backend.

It sits below `io.slide` (the dispatcher) and `io.backends.*`, which both import it and nothing of each other.
"""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path

import numpy as np

from wsi_vssm.io.base import to_rgb
from wsi_vssm.io.errors import MissingBackend

# How to install what each backend needs; named in MissingBackend messages.
INSTALL = {
    "openslide": "pip install openslide-python openslide-bin",
    "tifffile": "pip install tifffile imagecodecs",
    "imagecodecs": "pip install imagecodecs",
    "zarr": "pip install zarr",
}

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders

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


def is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in TIFF_MAGIC
    except OSError:
        return False


def tiff_ends_early(path: Path) -> bool:
    """Whether a TIFF's first image directory offset points past the end of the file (a truncated copy)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        size = os.path.getsize(path)
    except OSError:
        return False
    if head[:4] not in TIFF_MAGIC:
        return False
    order = "little" if head[:2] == b"II" else "big"
    big = head[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 8-byte offset at byte 8
    offset = int.from_bytes(head[8:16] if big else head[4:8], order)
    return offset >= size


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
