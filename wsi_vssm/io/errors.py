"""The exception tree at the slide I/O boundary. Backend errors are re-raised from these with `from`."""

from __future__ import annotations

import os

from wsi_vssm.errors import WsiVssmError


class SlideError(WsiVssmError):
    """A slide could not be opened or read. `str()` is one line: '<path>: <problem>'."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class UnsupportedFormat(SlideError):
    """No backend recognises the file (not a slide, wrong extension, a directory that is no OME-Zarr...)."""


class CorruptSlide(SlideError):
    """The file claims a supported format but its structure or pixel data is broken."""


class SlideReadError(CorruptSlide):
    """The slide opened, but decoding a region failed; the message names the region."""


class MissingBackend(SlideError):
    """The backend asked for (or the only one able to read the file) is not installed."""


class TooCoarse(SlideError):
    """The slide's scan is far coarser than the resolution it is to be read at: enlarged, it would hold no detail
    for the model and cost hours (a resolution typed wrong, 20 for 0.20, is the usual cause)."""


class MissingMpp(SlideError):
    """The slide carries no resolution and the operation needs one; pass --mpp / mpp=."""


class OutOfBounds(SlideError, ValueError):
    """A region lies wholly outside the slide, or a level does not exist."""
