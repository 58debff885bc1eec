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
from wsi_vssm.io.slide import open_slide  # light: backends import their libraries when a slide is opened

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

