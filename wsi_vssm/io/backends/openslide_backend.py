"""The OpenSlide backend: SVS, NDPI, generic tiled TIFF, DICOM WSI, MIRAX, SCN and the rest OpenSlide reads.

The handle is opened lazily and per process: a pickled reader carries its path and metadata, never the handle,
so readers can be sent to worker processes and reopened there.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from wsi_vssm.errors import one_line
from wsi_vssm.io.base import SlideReader, to_rgb
from wsi_vssm.io.errors import CorruptSlide, UnsupportedFormat
from wsi_vssm.io.formats import (
    is_tiff,
    missing_backend,
    mpp_from_objective,
    plausible_mpp,
    tiff_truncation,
    warn_non_square,
)


def _import_openslide(path):
    try:
        import openslide
    except (ImportError, OSError) as err:  # openslide-python missing, or its native library (openslide-bin)
        raise missing_backend(path, "openslide", one_line(err)) from err
    return openslide


class OpenSlideSlide(SlideReader):
    backend = "openslide"

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        openslide = _import_openslide(path)
        handle = self._open(path)
        truncated = tiff_truncation(path) if is_tiff(path) else None  # OpenSlide would fail on the first cut tile
        if truncated:
            handle.close()
            raise CorruptSlide(path, truncated)
        try:
            props = dict(handle.properties)
            level_dimensions = handle.level_dimensions
            level_downsamples = handle.level_downsamples
            associated = sorted(handle.associated_images.keys())  # names only; pixels are never read
        except (openslide.OpenSlideError, OSError, ValueError) as err:  # a broken file shows up lazily
            handle.close()
            raise CorruptSlide(path, f"OpenSlide cannot read its metadata: {one_line(err)}") from err
        mpp, source = _mpp(props)
        warn_non_square(path, props, mpp, plausible_mpp(props.get("openslide.mpp-y")))
        self.objective_power = _objective_power(props)
        if mpp is None and self.objective_power is not None:
            mpp, source = mpp_from_objective(self.objective_power), "objective-power"
        super().__init__(
            path,
            level_dimensions,
            level_downsamples,
            mpp=mpp,
            mpp_source=source,
            vendor=props.get("openslide.vendor"),
            associated_images=associated,
            properties=props,
        )
        self._handle, self._pid = handle, os.getpid()

    @staticmethod
    def _open(path: Path):
        openslide = _import_openslide(path)
        from wsi_vssm.io.dicom import open_failure_hint

        try:
            return openslide.OpenSlide(os.fspath(path))
        except openslide.OpenSlideUnsupportedFormatError as err:
            truncated = tiff_truncation(path)  # a cut TIFF's directory chain breaks off: say so
            if truncated:
                raise CorruptSlide(path, truncated) from err
            raise UnsupportedFormat(path, "OpenSlide does not recognise this file as a slide"
                                    + open_failure_hint(path)) from err
        except openslide.OpenSlideError as err:
            raise CorruptSlide(path, tiff_truncation(path) or f"OpenSlide cannot open it: {one_line(err)}"
                               + open_failure_hint(path)) from err
        except OSError as err:
            raise UnsupportedFormat(path, f"cannot open: {one_line(err)}") from err

    def _slide(self):
        # After a fork or an unpickle the handle is not ours (or not there): open a fresh one.
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = self._open(self.path), os.getpid()
        return self._handle

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        # OpenSlide takes level-0 coordinates and resamples any fractional remainder, so pick the level-0
        # point nearest to this level's pixel (exact whenever the downsample is an integer).
        location = (round(x * ds), round(y * ds))
        region = self._slide().read_region(location, level, (w, h))
        # openslide-python has already un-premultiplied the RGBA; compose it over white background.
        return to_rgb(np.asarray(region))

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handle"] = None
        return state


def _mpp(props: dict[str, str]) -> tuple[float | None, str]:
    mpp_x = plausible_mpp(props.get("openslide.mpp-x"))
    if mpp_x is None:
        return None, "none"
    return mpp_x, "openslide-properties"


def _objective_power(props: dict[str, str]) -> float | None:
    for key in ("openslide.objective-power", "aperio.AppMag"):
        try:
            power = float(props[key])
        except (KeyError, ValueError):
            continue
        if power > 0:
            return power
    return None
