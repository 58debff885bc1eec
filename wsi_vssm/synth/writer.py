"""A streaming writer of tiled pyramidal JPEG TIFFs that OpenSlide reads as 'generic-tiff'.

Level 0 is rendered tile by tile on worker threads (rendering is numba with the GIL released; JPEG encoding in
imagecodecs releases it too) and handed to tifffile as already-encoded tiles, in order. Each finished row of
level-0 tiles is also downsampled into the next level's row buffer; full rows of that level go to an
uncompressed temporary file beside the output, which is read back one tile row at a time when that level is
written (and downsampled in turn into the next). Peak memory is a few rows of tiles, whatever the slide size.
Every level is a top-level TIFF page (not a SubIFD); reduced levels carry NewSubfileType = 1.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

TILE = 256
DOWNSAMPLE = 4  # per level, as Aperio files; CAMELYON16's use 2: both are fine for OpenSlide
TOP_MAX = 1000  # stop once the smallest level fits in this many px


def level_sizes(width: int, height: int, top_max: int = TOP_MAX) -> list[tuple[int, int]]:
    """(width, height) of every level, finest first, each DOWNSAMPLE x smaller (rounded up)."""
    sizes = [(width, height)]
    while max(sizes[-1]) > top_max:
        w, h = sizes[-1]
        sizes.append((-(-w // DOWNSAMPLE), -(-h // DOWNSAMPLE)))
    return sizes


def encode_tile(tile: np.ndarray, quality: int) -> bytes:
    # exactly what tifffile does for compression='jpeg', photometric='rgb': YCbCr with 2x2 chroma subsampling
    return imagecodecs.jpeg8_encode(tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2))


def downsample(img: np.ndarray) -> np.ndarray:
    """Box-filter an (h, w, 3) uint8 image by DOWNSAMPLE (h and w multiples of it)."""
    h, w = img.shape[0] // DOWNSAMPLE, img.shape[1] // DOWNSAMPLE
    blocks = img.reshape(h, DOWNSAMPLE, w, DOWNSAMPLE, 3).astype(np.uint16).sum((1, 3))
    return ((blocks + DOWNSAMPLE * DOWNSAMPLE // 2) // (DOWNSAMPLE * DOWNSAMPLE)).astype(np.uint8)


def _tiles(n: int) -> int:
    return -(-n // TILE)


class _RowSpool:
    """Collects a level's pixels, row strips at a time, into whole tile rows in a temporary file."""

    def __init__(self, size: tuple[int, int], directory: Path):
        self.ntx, self.nty = _tiles(size[0]), _tiles(size[1])
        self.width = self.ntx * TILE
        self.buffer = np.full((TILE, self.width, 3), 255, np.uint8)
        self.filled = 0
        self.rows_written = 0
        self.file = tempfile.TemporaryFile(dir=directory, prefix=".synth-level-")  # noqa: SIM115 (see close)

    def add(self, strip: np.ndarray) -> None:
        """Append an (r, w, 3) strip below the last; columns or rows beyond the level are dropped."""
        w = min(strip.shape[1], self.width)
        pos = 0
        while pos < strip.shape[0] and self.rows_written < self.nty:
            r = min(strip.shape[0] - pos, TILE - self.filled)
            self.buffer[self.filled : self.filled + r, :w] = strip[pos : pos + r, :w]
            self.filled += r
            pos += r
            if self.filled == TILE:
                self._flush()

    def _flush(self) -> None:
        self.file.write(self.buffer.tobytes())
        self.buffer[:] = 255  # white: whatever is not overwritten is background
        self.filled = 0
        self.rows_written += 1

    def finish(self) -> None:
        if self.filled:
            self._flush()
        while self.rows_written < self.nty:
            self._flush()
        self.file.seek(0)

    def tile_rows(self) -> Iterator[np.ndarray]:
        for _ in range(self.nty):
            row = np.empty((TILE, self.width, 3), np.uint8)
            if self.file.readinto(memoryview(row).cast("B")) != row.nbytes:
                raise OSError("temporary pyramid file was truncated")
            yield row

    def close(self) -> None:
        self.file.close()


def _ordered(pool: ThreadPoolExecutor, jobs: Iterator[Callable], window: int) -> Iterator:
    """Results of `jobs` in order, with at most `window` in flight (bounded memory)."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _level0(render, size, spool, pool, window, quality, progress) -> Iterator[bytes]:
    ntx, nty = _tiles(size[0]), _tiles(size[1])

    def job(tx: int, ty: int):
        tile = render(tx * TILE, ty * TILE)
        return encode_tile(tile, quality), downsample(tile)

    jobs = ((lambda tx=tx, ty=ty: job(tx, ty)) for ty in range(nty) for tx in range(ntx))
    row: list[np.ndarray] = []
    for n, (data, small) in enumerate(_ordered(pool, jobs, window), start=1):
        # Hand the row down before yielding: tifffile stops pulling after the last tile, so work placed after
        # the final `yield` never runs (the next level's last tile row stayed white).
        row.append(small)
        if len(row) == ntx:
            if spool is not None:
                spool.add(np.concatenate(row, axis=1))
            row = []
        if progress is not None:
            progress(n)
        yield data


def _from_spool(src: _RowSpool, spool, pool, quality, progress, done) -> Iterator[bytes]:
    for row in src.tile_rows():
        tiles = [row[:, i * TILE : (i + 1) * TILE] for i in range(src.ntx)]
        if spool is not None:  # before the yields, as in _level0
            spool.add(downsample(row))
        done += src.ntx
        if progress is not None:
            progress(done)
        yield from pool.map(lambda t: encode_tile(np.ascontiguousarray(t), quality), tiles)


def write_repeated_tile_tiff(path: str | os.PathLike, side: int, tile: np.ndarray) -> None:
    """A side x side single-level (no pyramid) zlib-tiled RGB TIFF whose every tile is `tile` (256 x 256 x 3
    uint8), compressed once and repeated: a huge slide in seconds and a few MB, for bounded-memory tests."""
    data = imagecodecs.zlib_encode(np.ascontiguousarray(tile, np.uint8).tobytes())
    n = (-(-side // TILE)) ** 2
    tifffile.imwrite(path, iter([data] * n), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE),
                     compression="zlib", photometric="rgb", bigtiff=side * side * 3 > 2**31)


def write_pyramid(
    path: str | os.PathLike,
    size: tuple[int, int],
    render: Callable[[int, int], np.ndarray],
    mpp: float,
    *,
    workers: int = 2,
    quality: int = 85,
    description: str = "",
    progress: Callable[[int], None] | None = None,
) -> list[tuple[int, int]]:
    """Write `render(x0, y0) -> (256, 256, 3) uint8` tiles as a pyramid at `path`; returns the level sizes.

    Not atomic by itself: the caller writes to a temporary name and renames.
    """
    path = Path(path)
    sizes = level_sizes(*size)
    bigtiff = size[0] * size[1] * 3 > 2**31  # JPEG is smaller than raw, so this is a safe bound
    spools = [_RowSpool(s, path.parent) for s in sizes[1:]] + [None]
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool, tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
            for level, (w, h) in enumerate(sizes):
                if level == 0:
                    tiles = _level0(render, (w, h), spools[0], pool, 4 * max(1, workers), quality, progress)
                else:
                    spools[level - 1].finish()
                    done = sum(_tiles(a) * _tiles(b) for a, b in sizes[:level])
                    tiles = _from_spool(spools[level - 1], spools[level], pool, quality, progress, done)
                level_mpp = mpp * size[0] / w
                tw.write(
                    data=tiles, shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE),
                    photometric="rgb", compression="jpeg", subsampling=(2, 2),
                    resolution=(1e4 / level_mpp, 1e4 / level_mpp), resolutionunit="CENTIMETER",
                    subfiletype=1 if level else 0, description=description if level == 0 else None,
                    metadata=None, software="wsi-vssm",
                )  # fmt: skip
    finally:
        for s in spools:
            if s is not None:
                s.close()
    return sizes
