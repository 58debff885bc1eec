"""Square analysis regions over a slide's tissue, and a prefetching stream that reads them on worker threads.

`RegionGrid` lays `region_px` x `region_px` regions (at the analysis resolution `mpp`) over the whole slide,
keeps those that overlap tissue, and records for each region which output pixels are real slide pixels (edge
regions reach past the slide and are padded white by the reader). `RegionStream` reads the regions in grid
order on a small thread pool, at most `prefetch` regions ahead, so decoding overlaps the consumer's compute
and memory stays bounded.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from wsi_vssm.errors import UsageError
from wsi_vssm.io.base import SlideReader, resize
from wsi_vssm.io.tissue import DEFAULT_THUMBNAIL_SIDE, slide_tissue_mask, tissue_fraction


class NoTissueWarning(UserWarning):
    """A slide's tissue mask is empty (or no region reaches `min_tissue`), so its grid has no regions."""


@dataclass(frozen=True)
class Region:
    """One square region: the box (x, y, w, h) in level-0 pixels, read as `size` x `size` output pixels.

    `valid` = (x0, y0, x1, y1) is the part of the output, in output pixels, that lies wholly inside the slide;
    the rest is white padding to be masked out.
    """

    index: int
    row: int
    col: int
    x: int
    y: int
    w: int
    h: int
    size: int
    tissue: float
    valid: tuple[int, int, int, int]

    def valid_mask(self) -> np.ndarray:
        """A bool `size` x `size` mask of the output pixels that are real slide pixels."""
        m = np.zeros((self.size, self.size), dtype=bool)
        x0, y0, x1, y1 = self.valid
        m[y0:y1, x0:x1] = True
        return m


class RegionGrid:
    """The tissue regions of `slide`: `region_px` pixels square at `mpp`, stepping `region_px - overlap_px`.

    `tissue` is the slide's tissue mask from its thumbnail, as `(mask, scale)` (scale: level-0 pixels per mask
    pixel) or a bare mask over the whole slide; by default it is computed. A region is kept when its tissue
    fraction is > 0 and >= `min_tissue`. Raises `MissingMpp` when the slide has no resolution.
    """

    def __init__(
        self,
        slide: SlideReader,
        mpp: float,
        region_px: int,
        overlap_px: int = 0,
        min_tissue: float = 0.0,
        tissue: np.ndarray | tuple[np.ndarray, float] | None = None,
        thumbnail_side: int = DEFAULT_THUMBNAIL_SIDE,
    ):
        mpp0 = slide.require_mpp()
        _check_grid_args(mpp, region_px, overlap_px, min_tissue)
        self.slide_name = slide.name
        self.slide_dimensions = slide.dimensions
        self.mpp, self.region_px, self.overlap_px = float(mpp), int(region_px), int(overlap_px)
        self.min_tissue = float(min_tissue)
        self.scale = self.mpp / mpp0  # level-0 pixels per output pixel
        self.tissue_mask, self.mask_scale = _resolve_tissue(slide, tissue, thumbnail_side)
        self.regions = self._build()
        if not self.regions:
            reason = (
                "no tissue found" if not self.tissue_mask.any() else f"no region has >= {min_tissue} tissue"
            )
            warnings.warn(
                f"{self.slide_name}: {reason}; the region grid is empty and nothing will be read",
                NoTissueWarning,
                stacklevel=2,
            )

    def _build(self) -> list[Region]:
        w0, h0 = self.slide_dimensions
        side = max(1, round(self.region_px * self.scale))  # region side in level-0 px
        step = (self.region_px - self.overlap_px) * self.scale
        xs, ys = _starts(w0, side, step), _starts(h0, side, step)
        out: list[Region] = []
        for row, y in enumerate(ys):
            for col, x in enumerate(xs):
                ms = self.mask_scale
                frac = tissue_fraction(self.tissue_mask, (x / ms, y / ms, side / ms, side / ms))
                if frac <= 0 or frac < self.min_tissue:
                    continue
                out.append(
                    Region(
                        index=len(out), row=row, col=col, x=x, y=y, w=side, h=side, size=self.region_px,
                        tissue=frac, valid=self._valid_box(x, y, w0, h0),
                    )
                )  # fmt: skip
        return out

    def _valid_box(self, x: int, y: int, w0: int, h0: int) -> tuple[int, int, int, int]:
        # Output pixels that lie wholly inside the slide: floor, so no padded pixel counts as valid.
        x1 = min(self.region_px, math.floor((w0 - x) / self.scale + 1e-9))
        y1 = min(self.region_px, math.floor((h0 - y) / self.scale + 1e-9))
        return 0, 0, max(0, x1), max(0, y1)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the full grid, tissue or not."""
        return self.full_shape(self.slide_dimensions, self.scale, self.region_px, self.overlap_px)

    @staticmethod
    def full_shape(dimensions: tuple[int, int], scale: float, region_px: int, overlap_px: int) -> tuple[int, int]:
        """`shape` of the grid over level-0 `dimensions` (w, h) at `scale` level-0 px per output px, without
        building one (no tissue mask): what the cohort runner sizes slides by."""
        w0, h0 = dimensions
        side = max(1, round(region_px * scale))
        step = (region_px - overlap_px) * scale
        return len(_starts(h0, side, step)), len(_starts(w0, side, step))

    def __len__(self) -> int:
        return len(self.regions)

    def __iter__(self) -> Iterator[Region]:
        return iter(self.regions)

    def __getitem__(self, i: int) -> Region:
        return self.regions[i]

    def __repr__(self) -> str:
        return (
            f"<RegionGrid {self.slide_name} {len(self)} regions of {self.region_px}px at {self.mpp} um/px "
            f"(overlap {self.overlap_px}, min_tissue {self.min_tissue})>"
        )


def read_region(reader: SlideReader, region: Region, mpp: float) -> np.ndarray:
    """The region's pixels at `mpp`, exactly `size` x `size` x 3 (edge padding white)."""
    img = reader.read(region.x, region.y, region.w, region.h, mpp)
    if img.shape[0] != region.size or img.shape[1] != region.size:
        img = resize(img, region.size, region.size)  # rounding of the level-0 side can be off by a pixel
    return img


SlideSource = SlideReader | str | os.PathLike | Callable[[], SlideReader]


class RegionStream:
    """(region, H x W x 3 uint8) pairs in grid order, read ahead on `workers` threads.

    `source` is a thread-safe `SlideReader` shared by all workers (OpenSlide handles, `ArraySlide`), or a path
    or a zero-argument factory, called once per worker thread to give each its own reader (tifffile/zarr
    stores are not safe to share). Paths open with `open_slide(path, backend=backend, mpp=slide_mpp)`.

    At most `prefetch` regions (default 2 x workers) are being read or wait decoded in the stream, plus the
    one the consumer holds. A reader's error is re-raised in the consumer with its own type, after the
    threads are stopped; `close()`, leaving a `with` block, dropping a stream left early (garbage collection)
    and KeyboardInterrupt all cancel queued reads and join the threads.
    """

    def __init__(
        self,
        source: SlideSource,
        regions: Iterable[Region],
        mpp: float | None = None,
        workers: int = 2,
        prefetch: int | None = None,
        backend: str = "auto",
        slide_mpp: float | None = None,
    ):
        if mpp is None:
            mpp = getattr(regions, "mpp", None)
            if mpp is None:
                raise UsageError("RegionStream needs `mpp` unless `regions` is a RegionGrid")
        if not (isinstance(workers, int) and workers >= 1):
            raise UsageError(f"workers must be an integer >= 1, got {workers!r}")
        prefetch = 2 * workers if prefetch is None else prefetch
        if not (isinstance(prefetch, int) and prefetch >= 1):
            raise UsageError(f"prefetch must be an integer >= 1, got {prefetch!r}")
        self.mpp, self.workers, self.prefetch = float(mpp), workers, prefetch
        self._open = _reader_factory(source, backend, slide_mpp)
        self._shared = source if isinstance(source, SlideReader) else None
        self._todo: Iterator[Region] = iter(list(regions))
        self._pending: deque[tuple[Region, Future]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._opened: list[SlideReader] = []
        self._lock = threading.Lock()
        self._closed = False

    # ---- iteration ----------------------------------------------------------------------------------------
    def __iter__(self) -> RegionStream:
        return self

    def __next__(self) -> tuple[Region, np.ndarray]:
        if self._closed:
            raise StopIteration
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="wsi-vssm-region")
            for _ in range(self.prefetch):
                self._submit_next()
        if not self._pending:
            self.close()
            raise StopIteration
        region, fut = self._pending.popleft()
        try:
            img = fut.result()
        except BaseException:  # a reader's error or KeyboardInterrupt: stop the threads, then re-raise as is
            self.close()
            raise
        self._submit_next()
        return region, img

    def _submit_next(self) -> None:
        region = next(self._todo, None)
        if region is not None and self._pool is not None:
            self._pending.append((region, self._pool.submit(self._read, region)))

    def _read(self, region: Region) -> np.ndarray:
        if self._closed:  # queued before close() cancelled it
            raise _Cancelled()
        return read_region(self._reader(), region, self.mpp)

    def _reader(self) -> SlideReader:
        if self._shared is not None:
            return self._shared
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._open()
            self._local.reader = reader
            with self._lock:
                self._opened.append(reader)
        return reader

    # ---- lifetime -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Cancel queued reads, wait for running ones, join the threads and close per-thread readers."""
        if self._closed:
            return
        self._closed = True
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._todo = iter(())
        if self._pool is not None:
            # Garbage collection may close the stream from one of its own workers, which cannot join itself.
            own = threading.current_thread() in getattr(self._pool, "_threads", ())
            self._pool.shutdown(wait=not own, cancel_futures=True)
        with self._lock:
            opened, self._opened = self._opened, []
        for reader in opened:
            reader.close()

    def __enter__(self) -> RegionStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()


class _Cancelled(Exception):
    """A queued read that started after the stream was closed; never reaches the consumer."""


# ---- helpers ----------------------------------------------------------------------------------------------
def _check_grid_args(mpp: float, region_px: int, overlap_px: int, min_tissue: float) -> None:
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise UsageError(f"mpp must be a positive number, got {mpp!r}")
    if not (isinstance(region_px, int) and region_px >= 1):
        raise UsageError(f"region_px must be a positive integer, got {region_px!r}")
    if not (isinstance(overlap_px, int) and 0 <= overlap_px < region_px):
        raise UsageError(f"overlap_px must be an integer in [0, region_px={region_px}), got {overlap_px!r}")
    if not (0.0 <= min_tissue <= 1.0):
        raise UsageError(f"min_tissue must lie in [0, 1], got {min_tissue!r}")


def _starts(length: int, side: int, step: float) -> list[int]:
    """Level-0 starts along one axis so that the regions cover [0, length); the last may reach past it."""
    n = 1 if length <= side else math.ceil((length - side) / step - 1e-9) + 1
    return [round(i * step) for i in range(n)]


def _resolve_tissue(slide: SlideReader, tissue, thumbnail_side: int) -> tuple[np.ndarray, float]:
    if tissue is None:
        return slide_tissue_mask(slide, max_side=thumbnail_side)
    if isinstance(tissue, tuple):
        mask, scale = tissue
        return np.asarray(mask, dtype=bool), float(scale)
    mask = np.asarray(tissue, dtype=bool)
    if mask.ndim != 2 or mask.size == 0:
        raise UsageError(f"tissue mask must be a 2-D array, got shape {mask.shape}")
    w0, h0 = slide.dimensions
    return mask, max(w0 / mask.shape[1], h0 / mask.shape[0])


def _reader_factory(source, backend: str, slide_mpp: float | None) -> Callable[[], SlideReader]:
    if isinstance(source, SlideReader):
        return lambda: source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)

        def open_path() -> SlideReader:
            from wsi_vssm.io import open_slide  # lazy: the backends load only when a stream opens a file

            return open_slide(path, backend=backend, mpp=slide_mpp)

        return open_path
    if callable(source):
        return source
    raise UsageError(
        f"RegionStream source must be a SlideReader, a path or a factory, got {type(source).__name__}"
    )
