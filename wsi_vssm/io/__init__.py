"""Slide I/O: readers, tissue masks, region grids and streams, annotations."""

from wsi_vssm.io.backends.array import ArraySlide
from wsi_vssm.io.base import SlideReader
from wsi_vssm.io.errors import (
    CorruptSlide,
    MissingBackend,
    MissingMpp,
    OutOfBounds,
    SlideError,
    SlideReadError,
    UnsupportedFormat,
)

__all__ = [
    "ArraySlide",
    "CorruptSlide",
    "MissingBackend",
    "MissingMpp",
    "OutOfBounds",
    "SlideError",
    "SlideReadError",
    "SlideReader",
    "UnsupportedFormat",
    "open_slide",
]


def __getattr__(name):
    # open_slide and the heavier pieces load on first use, so `import wsi_vssm.io` stays light.
    if name == "open_slide":
        from wsi_vssm.io.slide import open_slide

        return open_slide
    raise AttributeError(name)
