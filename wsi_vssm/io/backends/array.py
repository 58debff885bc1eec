"""An in-memory slide over a numpy array, with the same API as the file backends (for tests and demos)."""

from __future__ import annotations

import math

import numpy as np

from wsi_vssm.errors import UsageError
from wsi_vssm.io.base import SlideReader, resize, to_rgb


class ArraySlide(SlideReader):
    """A slide over an H x W x 3 array; coarser levels are built by halving until the side is <= `min_side`.

    `levels` may instead give the pyramid explicitly (finest first).
    """

    backend = "array"

    def __init__(
        self,
        image: np.ndarray | None = None,
        mpp: float | None = None,
        levels: list[np.ndarray] | None = None,
        min_side: int = 256,
        name: str = "array",
    ):
        if levels is None:
            if image is None:
                raise UsageError("ArraySlide needs `image` or `levels`")
            levels = [to_rgb(_image(image))]
            while max(levels[-1].shape[:2]) > min_side and min(levels[-1].shape[:2]) >= 2:
                h, w = levels[-1].shape[:2]
                levels.append(resize(levels[-1], w // 2, h // 2))
        self._levels = [to_rgb(_image(lv)) for lv in levels]
        if mpp is not None and not _positive(mpp):
            raise UsageError(f"ArraySlide: mpp must be a positive number of microns per pixel, got {mpp!r}")
        super().__init__(
            path=None,
            level_dimensions=[(a.shape[1], a.shape[0]) for a in self._levels],
            mpp=mpp,
            mpp_source="user" if mpp is not None else "none",
            vendor="array",
        )
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._levels[level][y : y + h, x : x + w].copy()


def _image(a) -> np.ndarray:
    """An H x W or H x W x C (C = 1 to 4) array; a channel-first one (C x H x W, as torch holds images) is refused
    with the fix rather than read as 3 rows of 64 channels."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] > 4:
        raise UsageError(f"ArraySlide: the image is {a.shape}, channel-first; pass H x W x 3 "
                         "(np.moveaxis(image, 0, -1))")
    if a.ndim not in (2, 3) or (a.ndim == 3 and not 1 <= a.shape[2] <= 4) or 0 in a.shape:
        raise UsageError(f"ArraySlide: the image must be H x W or H x W x 3 (1 to 4 channels), got {a.shape}")
    return a


def _positive(value) -> bool:
    try:
        return not isinstance(value, (bool, str)) and math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False
