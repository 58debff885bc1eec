"""An in-memory slide over a numpy array, with the same API as the file backends (for tests and demos)."""

from __future__ import annotations

import numpy as np

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
                raise ValueError("ArraySlide needs `image` or `levels`")
            levels = [to_rgb(image)]
            while max(levels[-1].shape[:2]) > min_side and min(levels[-1].shape[:2]) >= 2:
                h, w = levels[-1].shape[:2]
                levels.append(resize(levels[-1], w // 2, h // 2))
        self._levels = [to_rgb(lv) for lv in levels]
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
