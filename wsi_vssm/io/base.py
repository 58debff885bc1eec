"""The slide API every backend implements.

Coordinate rules (as OpenSlide): `location` is always in level-0 pixels, `size` is in pixels of the level being
read, levels are ordered finest first, dimensions are (width, height), and arrays are H x W x 3 uint8 RGB.
A read that partly crosses the slide edge is padded with white background; a read wholly outside raises.
Backends implement only `_read_level`, which is always called with a box that lies inside the level.
"""

from __future__ import annotations

import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsi_vssm.errors import is_real_number, one_line, printable
from wsi_vssm.io.errors import CorruptSlide, MissingMpp, OutOfBounds, SlideError, SlideReadError

log = logging.getLogger("wsi_vssm.io")
BACKGROUND = 255  # white: what a brightfield scanner sees where there is no tissue

# Microns per pixel a microscope scan can plausibly have at level 0. Outside it a resolution is a writer's
# default (72 dpi = 352.8 um/px, 300 dpi = 84.7 um/px), not a measurement, and is treated as absent
# (`io.formats.plausible_mpp`; here because a reader's missing-resolution message names it).
PLAUSIBLE_MPP = (0.01, 20.0)

# What a folder of slides is searched for (cohort tables, folder runs, a folder of one DICOM series)
SLIDE_SUFFIXES = (
    ".ome.tiff", ".ome.tif", ".ome.zarr", ".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu",
    ".bif", ".svslide", ".dcm", ".zarr",
)  # fmt: skip


def output_name(path: str | os.PathLike) -> str:
    """The name a slide's outputs take (`SlideReader.name`, a run's slide, a table's row for it): `slide_name`,
    except for a file of a DICOM series, which is named after its folder when that folder holds the series
    alone (IDC's layout, a converter's folder per slide; the folder's whole name, `folder_name`), else after its
    base-level file, whichever of its files is given. Its files' own names say nothing: converters name them
    `wsi-000000.dcm` in every folder, or by UID."""
    from wsi_vssm.io.dicom import folder_slide, series_of  # standard library only; nothing read for an .svs

    found = series_of(path)  # (the base-level file, its series' files), or None for any other slide
    if found is None:
        return _zarr_series_name(path) or slide_name(path)
    folder = Path(path).parent
    named = os.path.basename(os.path.abspath(folder)) if folder_slide(folder, SLIDE_SUFFIXES) == found[0] else ""
    return folder_name(named) if named else slide_name(found[0])  # `predict .` inside it: named, not "."


def _zarr_series_name(path: str | os.PathLike) -> str | None:
    """A series folder of a bioformats2raw store given alone (`case.zarr/0`, as napari-ome-zarr opens it) is named
    after its store, not `0`: `case`, or `case-1` where the store holds more than one series. None otherwise."""
    from wsi_vssm.io.zarr_meta import bioformats2raw_series  # standard library only

    found = bioformats2raw_series(path)
    if found is None:
        return None
    store, n = found
    return slide_name(store) if n == 1 else f"{slide_name(store)}-{Path(os.path.abspath(path)).name}"


def folder_name(folder: str | os.PathLike) -> str:
    """A folder's own name as a slide's name (a folder of one DICOM series): kept whole (`case.v2`, `Smith.J`:
    a folder has no extension to drop), made printable as `slide_name` makes it."""
    return _printable(Path(folder).name)


def slide_name(path: str | os.PathLike) -> str:
    """A slide file's name without its extension(s) (`a.ome.tiff` -> `a`, `b.SVS` -> `b`, `c.v2.tif` -> `c.v2`;
    a last "extension" of digits is none: `1.2.840.5` stays whole):
    the one rule for slide names (`SlideReader.name`, output folders, feature stores, cohort rows). The case is
    kept: cohorts match names case-insensitively by lower-casing them themselves. A file name that is not valid
    UTF-8 keeps its stray bytes as `\\xNN` text, and control characters (a newline) are escaped the same way
    (`\\n`), so the name can be written into JSON, CSV, one-line messages and pictures."""
    name = _printable(Path(path).name)
    for ext in (".ome.tiff", ".ome.tif", ".ome.zarr"):  # two-part extensions: Path.stem would leave `.ome`
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    # a DICOM file named by its UID without `.dcm` (`1.2.826.0.1.3680043.8.498.8361`) has no extension to drop:
    # the stem would name every file of that UID root alike
    return name if Path(name).suffix[1:].isdigit() else Path(name).stem


def _printable(raw: str) -> str:
    """A file name as text for JSON, CSV, messages and file names: stray bytes and control characters escaped."""
    try:
        data = os.fsencode(raw)  # the bytes on disk, whatever the file system encoding
    except UnicodeEncodeError:  # a name given as text the file system encoding cannot spell
        data = raw.encode("utf-8", "surrogateescape")
    name = data.decode("utf-8", "backslashreplace")
    try:
        os.fsencode(name)  # outputs are named after it: under an ASCII locale (LC_ALL=C, PYTHONUTF8=0) UTF-8
    except UnicodeEncodeError:  # letters cannot be file names, so they are kept as `\xNN` text too
        name = data.decode("ascii", "backslashreplace")
    return printable(name)


def tiff_resolution_um(resolution: object, unit: object) -> float | None:
    """Microns per pixel from a TIFF XResolution (pixels per unit) and ResolutionUnit (2 inch, 3 cm, and tifffile's
    own 4 mm and 5 um), plausible or not; also as the readers' properties spell them ('(200, 1)' or '200'; '3' or
    'centimeter')."""
    per_unit = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0, "inch": 25400.0, "centimeter": 10000.0,
                "millimeter": 1000.0, "micrometer": 1.0}
    per_unit = per_unit.get(int(unit) if isinstance(unit, int) or str(unit).isdigit() else str(unit).lower())
    if per_unit is None:
        return None
    if isinstance(resolution, str):
        resolution = tuple(resolution.strip("() ").split(",")) if "," in resolution else resolution
    try:
        if isinstance(resolution, tuple):
            num, den = resolution
            pixels = float(num) / float(den)
        else:
            pixels = float(resolution)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return per_unit / pixels if pixels > 0 else None


WRITER_DPI = (72, 96, 150, 300, 600)  # resolutions image software writes when it knows none
OME_STATED_UM = "ome.pixel-size-x-um"  # the property holding OME's stated pixel size, plausible or not
UNITLESS_SCALE = "ome-zarr.scale-without-unit"  # an OME-Zarr x scale whose axis names no length unit


def ignored_mpp(properties: dict[str, str]) -> str | None:
    """Why a reader has no resolution although its file states one ('the file states an implausible 50 um/px
    ...'), from the properties the readers keep: OME's pixel size (OME-TIFF PhysicalSizeX, an OME-Zarr scale),
    OpenSlide's mpp-x, an SVS MPP field, the TIFF resolution tags.
    None when none of them states one, or the one stated is plausible."""
    tags = tiff_resolution_um(properties.get("tiff.XResolution"), properties.get("tiff.ResolutionUnit"))
    stated = (("OME metadata", properties.get(OME_STATED_UM)), ("openslide.mpp-x", properties.get("openslide.mpp-x")),
              ("SVS MPP", properties.get("aperio.MPP")))
    lo, hi = PLAUSIBLE_MPP
    if properties.get(UNITLESS_SCALE):
        return f"the file's x axis has a scale of {properties[UNITLESS_SCALE]}, so no physical resolution"
    for where, value in (*stated, ("TIFF resolution tags", tags)):
        try:
            mpp = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(mpp) and lo <= mpp <= hi:
            return None
        dpi = 25400.0 / mpp if mpp > 0 else 0.0
        if any(abs(dpi - d) < 0.01 for d in WRITER_DPI):  # e.g. 72 dpi: image software's default, not a scan's
            where += f": {round(dpi)} dpi, an image writer's default rather than the scan's resolution"
        return f"the file states an implausible {mpp:.4g} um/px ({where}; plausible: {lo:g}-{hi:g}), so it was ignored"
    return None


class SlideReader(ABC):
    """A multi-resolution slide. Subclasses set the attributes in `__init__` and implement `_read_level`."""

    backend: str = "abstract"

    def __init__(
        self,
        path: str | os.PathLike | None,
        level_dimensions: Sequence[tuple[int, int]],
        level_downsamples: Sequence[float] | None = None,
        mpp: float | None = None,
        mpp_source: str = "none",  # where mpp came from: the table in docs/formats.md, "Resolution (mpp)"
        vendor: str | None = None,
        associated_images: Sequence[str] = (),
        properties: dict[str, str] | None = None,
    ):
        self.path = None if path is None else Path(path)
        self.level_dimensions = tuple((int(w), int(h)) for w, h in level_dimensions)
        if not self.level_dimensions:
            raise SlideError(path, "slide has no image levels")
        empty = [(i, w, h) for i, (w, h) in enumerate(self.level_dimensions) if w < 1 or h < 1]
        if empty:
            i, w, h = empty[0]
            raise CorruptSlide(path, f"level {i} is {w} x {h} px: an empty image")
        w0, h0 = self.level_dimensions[0]
        if level_downsamples is None:
            # The mean of both axes' ratios, as OpenSlide derives it, so that backends agree on one file.
            level_downsamples = [(w0 / w + h0 / h) / 2 for w, h in self.level_dimensions]
        self.level_downsamples = tuple(float(d) for d in level_downsamples)
        self.mpp = None if mpp is None else float(mpp)
        self.mpp_source = mpp_source if mpp is not None else "none"
        self.vendor = vendor
        self.associated_images = tuple(associated_images)  # names only: their pixels never leave the reader
        self.properties = dict(properties or {})

    # ---- metadata -------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The slide's name without extension(s), as used for output folders and cohort tables."""
        return "array" if self.path is None else output_name(self.path)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def set_mpp(self, mpp: float, source: str = "user") -> None:
        if not (mpp > 0 and math.isfinite(mpp)):
            raise SlideError(self.path, f"mpp must be a positive number, got {mpp}")
        self.mpp, self.mpp_source = float(mpp), source

    def require_mpp(self) -> float:
        if self.mpp is None:
            ignored = ignored_mpp(self.properties)
            fallback = f"(--fallback-mpp: only for the slides that state none{' or one ignored so' if ignored else ''})"
            raise MissingMpp(self.path, f"{ignored}; give the right one with --mpp {fallback}" if ignored else
                             f"slide has no resolution (microns per pixel); state it with --mpp {fallback}")
        return self.mpp

    def level_mpp(self, level: int) -> float:
        return self.require_mpp() * self.level_downsamples[level]

    def best_level_for_downsample(self, downsample: float, tolerance: float = 0.0) -> int:
        """The coarsest level that is still at least as fine as `downsample`, or at most `tolerance` (a share)
        coarser than it."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + max(tolerance, 1e-6)):
                best = i
        return best

    # ---- pixels ---------------------------------------------------------------------------------------------
    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read the box (x, y, w, h) in this level's own pixels, wholly inside it, as H x W x 3 uint8."""

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read `size` (w, h) pixels of `level` whose top-left corner is `location` in level-0 pixels."""
        if not 0 <= level < self.level_count:
            raise OutOfBounds(self.path, f"level {level} does not exist (slide has {self.level_count})")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise SlideError(self.path, f"region size must be positive, got {w}x{h}")
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # Top-left in level pixels; floor so that adjacent level-0 tiles stay adjacent at coarse levels.
        lx, ly = math.floor(location[0] / ds), math.floor(location[1] / ds)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        if x0 >= x1 or y0 >= y1:
            raise OutOfBounds(
                self.path,
                f"region at {tuple(location)} size {w}x{h} (level {level}) lies wholly outside the slide "
                f"({self.dimensions[0]}x{self.dimensions[1]} at level 0)",
            )
        try:
            inner = self._read_level(level, x0, y0, x1 - x0, y1 - y0)
        except (SlideError, MemoryError):
            raise  # a MemoryError is the machine's limit, not the slide's: the runner says so, a rerun retries it
        except Exception as err:  # backend decode failures differ by backend; name the region for the user
            raise SlideReadError(
                self.path,
                f"reading region at {tuple(location)} size {w}x{h} (level {level}) failed: {one_line(err)}",
            ) from err
        if (x0, y0, x1, y1) == (lx, ly, lx + w, ly + h):
            return inner
        out = np.full((h, w, 3), BACKGROUND, dtype=np.uint8)
        out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = inner
        return out

    def read(self, x: float, y: float, w: float, h: float, mpp: float) -> np.ndarray:
        """The level-0 box (x, y, w, h) resampled to `mpp` microns per pixel, read from the nearest finer level,
        or a level at most `LEVEL_TOLERANCE` coarser (enlarged a little, bilinear).

        The output has round(w * mpp0 / mpp) x round(h * mpp0 / mpp) pixels.
        """
        mpp0 = self.require_mpp()
        # 0 divided by zero, -1 gave a 1 x 1 image, NaN a ValueError, "1" a TypeError
        if not (is_real_number(mpp) and mpp > 0 and math.isfinite(mpp)):
            raise SlideError(self.path, f"read: mpp must be a positive number, got {mpp!r}")
        if not (all(map(is_real_number, (x, y, w, h))) and w > 0 and h > 0
                and math.isfinite(w) and math.isfinite(h) and math.isfinite(x) and math.isfinite(y)):
            raise SlideError(self.path, f"read: the box must be finite with a positive size, got {(x, y, w, h)}")
        scale = mpp / mpp0  # level-0 pixels per output pixel
        out_w, out_h = max(1, round(w / scale)), max(1, round(h / scale))
        level = self.best_level_for_downsample(scale, LEVEL_TOLERANCE)
        ds = self.level_downsamples[level]
        lx, ly = math.floor(x / ds), math.floor(y / ds)
        lw = max(1, math.ceil((x + w) / ds) - lx)
        lh = max(1, math.ceil((y + h) / ds) - ly)
        img = self.read_region((round(lx * ds), round(ly * ds)), level, (lw, lh))
        if (lw, lh) == (out_w, out_h):
            return img
        return resize(img, out_w, out_h)

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The whole slide, its longer side at most `max_side` pixels, from the coarsest level that suffices.

        A level too large to hold in memory at once (a slide with no small level, e.g. a single-level TIFF of
        200,000 px a side) is streamed in blocks, each area-averaged to its part of the thumbnail.
        """
        w0, h0 = self.dimensions
        scale = max(w0, h0) / max_side
        if scale <= 1:
            return self.read_region((0, 0), 0, (w0, h0))
        level = self.best_level_for_downsample(scale)
        lw, lh = self.level_dimensions[level]
        out_w, out_h = max(1, round(w0 / scale)), max(1, round(h0 / scale))
        if lw * lh <= self.thumbnail_read_limit:
            return resize(self.read_region((0, 0), level, (lw, lh)), out_w, out_h)
        return self._streamed_thumbnail(level, out_w, out_h)

    # Level pixels read in one piece for a thumbnail; larger levels are streamed in blocks (64 MP: ~200 MB RGB).
    thumbnail_read_limit = 64 * 1024 * 1024
    THUMBNAIL_BLOCK = 4096  # level px per block side when streaming

    def _streamed_thumbnail(self, level: int, out_w: int, out_h: int) -> np.ndarray:
        """`thumbnail` of a huge level, in bounded memory: from its tiles where the backend hands them out
        (`_map_tiles`), else from output blocks read one at a time (peak memory ~ one block), each level block
        spanning whole output pixels, so block seams fall between output pixels."""
        lw, lh = self.level_dimensions[level]
        if out_w <= lw and out_h <= lh:
            try:
                thumb = _TileThumbnail(lw, lh, out_w, out_h).run(self, level)
            except (SlideError, MemoryError):
                raise
            except Exception as err:  # a tile that does not decode: one line naming the file, as read_region
                raise SlideReadError(self.path, f"reading the tiles of level {level} failed: {one_line(err)}") \
                    from err
            if thumb is not None:
                return thumb
        ds = self.level_downsamples[level]
        fx, fy = lw / out_w, lh / out_h  # level px per output px
        bx, by = max(1, int(self.THUMBNAIL_BLOCK // fx)), max(1, int(self.THUMBNAIL_BLOCK // fy))
        out = np.empty((out_h, out_w, 3), np.uint8)
        blocks = [(r, c) for r in range(0, out_h, by) for c in range(0, out_w, bx)]
        log.info("%s: thumbnail streamed from level %d (%d x %d px) in %d blocks", self.path, level, lw, lh,
                 len(blocks))
        for r, c in _maybe_bar(blocks, f"thumbnail of {self.name}"):
            r1, c1 = min(out_h, r + by), min(out_w, c + bx)
            x0, y0 = round(c * fx), round(r * fy)
            x1, y1 = min(lw, max(x0 + 1, round(c1 * fx))), min(lh, max(y0 + 1, round(r1 * fy)))
            img = self.read_region((round(x0 * ds), round(y0 * ds)), level, (x1 - x0, y1 - y0))
            out[r:r1, c:c1] = resize(img, c1 - c, r1 - r)
        return out

    def _map_tiles(self, level: int, func):
        """((tile_h, tile_w), iterator over `func(y, x, tile)` for every tile of `level`), or None.

        A backend that can decode a level tile by tile (in threads, calling `func` there) overrides this, and
        huge thumbnails are then summed tile by tile as they are decoded. `tile` is its tile_h x tile_w x 3 uint8
        pixels (edge tiles padded), or None for a tile with no data (background); y, x its level px origin.
        """
        return None

    # ---- lifetime -------------------------------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - backends without handles have nothing to close
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"<{type(self).__name__} {self.path or ''} {w}x{h} levels={self.level_count} mpp={self.mpp}>"


class _TileThumbnail:
    """A box-filtered thumbnail summed tile by tile: each output pixel is the mean of the level pixels whose
    centres fall in it (the rule of PIL's BOX resize of the whole level), in exact integer sums.

    Why: a huge level (a single-level TIFF of 200,000 px a side) is mostly decode time; summing each tile where it
    is decoded adds little to that, while copying tiles into blocks and resampling the blocks cost as much again.
    """

    def __init__(self, lw: int, lh: int, out_w: int, out_h: int):
        # output row / column o of every level row / column i: o * L / out < i + 0.5 <= (o + 1) * L / out (PIL's
        # BOX rule, ties included), in integers
        self.oy = ((2 * np.arange(lh, dtype=np.int64) + 1) * out_h - 1) // (2 * lh)
        self.ox = ((2 * np.arange(lw, dtype=np.int64) + 1) * out_w - 1) // (2 * lw)
        self.out_w, self.out_h = out_w, out_h
        self.rows: dict[int, tuple] = {}
        self.cols: dict[int, tuple] = {}

    def run(self, slide: SlideReader, level: int) -> np.ndarray | None:
        """The thumbnail of `level`, or None when the backend does not hand out its tiles."""
        tiles = slide._map_tiles(level, self._sum_tile)
        if tiles is None:
            return None
        (th, tw), results = tiles
        for y in range(0, self.oy.size, th):  # the tile grid's groups, before threads use them
            self.rows[y] = _groups(self.oy[y : y + th])
        for x in range(0, self.ox.size, tw):
            self.cols[x] = _groups(self.ox[x : x + tw])
        n = len(self.rows) * len(self.cols)
        log.info("%s: thumbnail summed from the %d tiles of level %d", slide.path, n, level)
        acc = np.zeros((self.out_h, self.out_w, 3), np.uint32)  # 255 * (px per output px) fits below 4e9
        for oy, ox, sums in _maybe_bar(results, f"thumbnail of {slide.name}", n, "tile"):
            acc[oy : oy + sums.shape[0], ox : ox + sums.shape[1]] += sums
        rows = np.bincount(self.oy, minlength=self.out_h).astype(np.float32)  # level px per output px
        cols = np.bincount(self.ox, minlength=self.out_w).astype(np.float32)
        thumb = np.empty(acc.shape, np.uint8)
        for r in range(0, self.out_h, 256):  # means in bands: no full-size float copies
            band = acc[r : r + 256].astype(np.float32)
            band /= np.multiply.outer(rows[r : r + 256], cols)[..., None]
            thumb[r : r + 256] = np.rint(band, out=band)
        return thumb

    def _sum_tile(self, y: int, x: int, tile: np.ndarray | None) -> tuple[int, int, np.ndarray]:
        """(first output row, first output column, per-output-pixel sums) of one tile; runs in decode threads."""
        oy, row_starts, row_sizes = self.rows[y]
        ox, col_starts, col_sizes = self.cols[x]
        if tile is None:
            sums = BACKGROUND * np.multiply.outer(row_sizes, col_sizes).astype(np.uint32)
            return oy, ox, np.repeat(sums[..., None], 3, axis=2)
        t = tile[: int(row_sizes.sum()), : int(col_sizes.sum())]  # edge tiles: the part inside the level
        ends = np.append(row_starts[1:], t.shape[0])
        # rows first (contiguous), then columns of the few summed rows; uint16 sums (faster) while they fit
        dtype = np.uint16 if row_sizes.max() * 255 < 2**16 else np.uint32
        rows = np.stack([t[a:b].sum(axis=0, dtype=dtype) for a, b in zip(row_starts, ends, strict=True)])
        return oy, ox, np.add.reduceat(rows, col_starts, axis=1, dtype=np.uint32)


def _groups(out_index: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(first output index, start of each run of equal output indices, run lengths) along one tile side."""
    starts = np.flatnonzero(np.diff(out_index, prepend=out_index[0] - 1))
    return int(out_index[0]), starts, np.diff(np.append(starts, out_index.size))


def _maybe_bar(items, desc: str, total: int | None = None, unit: str = "block"):
    """A progress bar over `items` on a terminal when there are many (tqdm hides itself in logs)."""
    total = len(items) if total is None else total
    if total < 64:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, disable=None)


# A level this much coarser than a read asks for is read and enlarged, not one 2-4x finer read and shrunk: a
# CAMELYON16 slide's 0.972 um/px level serves the model's 0.97 (level 1 was read before: 4x the pixels to decode).
LEVEL_TOLERANCE = 0.05


def resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area-average downsizing (bilinear when enlarging) of an H x W x C uint8 image."""
    from PIL import Image

    if img.shape[1] == width and img.shape[0] == height:
        return img
    pil = Image.fromarray(img)
    shrinking = width < img.shape[1] and height < img.shape[0]
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(pil.resize((width, height), method))


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """Any decoded tile (gray, gray+alpha, RGB, RGBA, 16-bit) as H x W x 3 uint8 with transparent -> white."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = _to_uint8(a)
    if a.ndim == 2:
        a = a[..., None]
    c = a.shape[2]
    if c == 1:
        return np.repeat(a, 3, axis=2)
    if c == 2:
        gray, alpha = a[..., :1], a[..., 1:2]
        return np.repeat(_over_white(gray, alpha), 3, axis=2)
    if c >= 4:
        if a[..., 3].min() == BACKGROUND:  # opaque, as nearly every OpenSlide tile: composing would change nothing
            return np.ascontiguousarray(a[..., :3])
        return _over_white(a[..., :3], a[..., 3:4])
    return np.ascontiguousarray(a[..., :3])


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + BACKGROUND * (255 - a) + 127) // 255).astype(np.uint8)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if np.issubdtype(a.dtype, np.floating):
        return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    top = np.iinfo(a.dtype).max if np.issubdtype(a.dtype, np.integer) else 255
    return (a.astype(np.float64) * (255.0 / top) + 0.5).astype(np.uint8)

