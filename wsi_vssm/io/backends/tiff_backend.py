"""The tifffile backend: pyramidal TIFF, SVS, OME-TIFF, NDPI (where tifffile can), with no native library.

Each level is a zarr array over `TiffFile.aszarr()`: a read decodes only the tiles (or NDPI strips) it
touches, never a whole level. The file is opened lazily and per process; a pickled reader carries only its
path and metadata.

Float and signed samples are read in the range `formats.sample_top` picks from their minimum and maximum: the
TIFF's SMinSampleValue / SMaxSampleValue tags when it has both, else the finite values of the coarsest level
(`formats.peek_windows`: all of it up to 1,024 px a side, else windows spread over it; never a scan of a whole
large level). NaN reads as white.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_vssm.errors import one_line
from wsi_vssm.io.base import OME_STATED_UM, SlideReader
from wsi_vssm.io.errors import CorruptSlide, SlideError, UnsupportedFormat
from wsi_vssm.io.formats import (
    channels_to_rgb,
    is_tiff,
    length_to_um,
    missing_backend,
    module_available,
    mpp_from_objective,
    mpp_from_tiff_resolution,
    needs_range,
    peek_windows,
    plausible_mpp,
    sample_range,
    sample_top,
    tiff_truncation,
    warn_non_square,
    warn_unread_planes,
)
from wsi_vssm.resources import available_cpus

_VENDORS = (  # tifffile's format flag -> the vendor name OpenSlide uses for the same files
    ("is_svs", "aperio"),
    ("is_ndpi", "hamamatsu"),
    ("is_scn", "leica"),
    ("is_philips", "philips"),
    ("is_bif", "ventana"),
    ("is_ome", "ome-tiff"),
)
_TAGS = ("ImageDescription", "Software", "Make", "Model", "DateTime")
_TAGS += ("XResolution", "YResolution", "ResolutionUnit")


def _import(path, name: str, install: str):
    try:
        return __import__(name)
    except ImportError as err:
        raise missing_backend(path, install, one_line(err)) from err


@dataclass
class _TiffInfo:
    level_dimensions: list[tuple[int, int]]
    axes: list[str]
    mpp: float | None = None
    mpp_source: str = "none"
    objective_power: float | None = None
    vendor: str = "generic-tiff"
    series: int = 0  # the slide's series in tifffile's list (`_main_series`)
    associated: list[str] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)
    colours: str = "rgb"  # how samples become RGB: "rgb" (as they are), "palette", "inverted" or "cmyk"
    palette: np.ndarray | None = None  # (entries, 3) uint8, for "palette"


class TiffSlide(SlideReader):
    backend = "tifffile"

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        _import(path, "zarr", "zarr")
        tf = self._open(path)
        try:
            truncated = tiff_truncation(path)  # tifffile skips what lies past the end with a log line only
            if truncated:
                raise CorruptSlide(path, truncated)
            info = _describe(tf, path)
            top = _top(tf, info, path)
        except SlideError:
            tf.close()
            raise
        except Exception as err:  # malformed tags surface as many exception types
            tf.close()
            raise CorruptSlide(path, f"cannot parse its TIFF structure: {one_line(err)}") from err
        self.objective_power = info.objective_power
        self._axes, self._series = info.axes, info.series
        self._colours, self._palette = info.colours, info.palette
        super().__init__(
            path,
            info.level_dimensions,
            mpp=info.mpp,
            mpp_source=info.mpp_source,
            vendor=info.vendor,
            associated_images=info.associated,
            properties=info.properties,
        )
        self._tf, self._pid, self._arrays = tf, os.getpid(), {}
        self._top = top  # the sample value read as 255; None: uint8 as it is, unsigned over the type's range
        dtype = tf.series[info.series].dtype  # the raw value that reads as white, for missing tiles:
        self._white = dtype.type(top if top is not None else np.iinfo(dtype).max if dtype.kind == "u" else 255)
        if info.colours in ("inverted", "cmyk"):
            self._white = dtype.type(0)
        elif info.colours == "palette":
            self._white = dtype.type(int(np.argmax(info.palette.astype(int).sum(1))))

    @staticmethod
    def _open(path: Path):
        tifffile = _import(path, "tifffile", "tifffile")
        if path.is_dir() or not is_tiff(path):
            raise UnsupportedFormat(path, "not a TIFF file")
        try:
            return tifffile.TiffFile(path)
        except OSError as err:
            raise UnsupportedFormat(path, f"cannot open: {one_line(err)}") from err
        except (tifffile.TiffFileError, ValueError, IndexError, KeyError, EOFError) as err:
            raise CorruptSlide(path, tiff_truncation(path) or f"broken TIFF structure: {one_line(err)}") from err

    def _file(self):
        if self._tf is None or self._pid != os.getpid():  # unpickled, or forked: open our own handle
            self._tf, self._pid, self._arrays = self._open(self.path), os.getpid(), {}
        return self._tf

    def _array(self, level: int):
        tf = self._file()
        arr = self._arrays.get(level)
        if arr is None:
            arr = self._arrays[level] = _level_array(tf, self.path, self._series, level, self._white)
        return arr

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        tile = _samples(self._array(level), self._axes[level], x, y, w, h)
        if self._colours == "palette":
            return self._palette[np.minimum(tile, len(self._palette) - 1)]
        if self._colours == "cmyk":
            return _cmyk_to_rgb(tile)
        rgb = channels_to_rgb(tile, samples="S" in self._axes[level], top=self._top)
        return 255 - rgb if self._colours == "inverted" else rgb

    def _map_tiles(self, level: int, func):
        """Every tile of a plain tiled RGB level, read in file order and decoded by tifffile in threads with
        `func` applied there (a huge thumbnail without zarr's per-read overhead). None for other layouts
        (strips, NDPI, planar, gray, 16-bit, more axes), which read through zarr."""
        page = _plain_tiled_page(self._file().series[self._series].levels[level], self._axes[level])
        if page is None:
            return None
        th, tw = page.tilelength, page.tilewidth

        def one(result):
            tile, index, _ = result  # index: (sample, depth, y, x, sample) of the tile's origin
            return func(int(index[2]), int(index[3]), None if tile is None else tile.reshape(th, tw, 3))

        workers = min(4, available_cpus())  # not the host's cores: a container's or a SLURM job's share
        return (th, tw), page.segments(func=one, maxworkers=workers, buffersize=16 << 20)  # 16 MB read at once

    def close(self) -> None:
        if self._tf is not None and self._pid == os.getpid():
            self._tf.close()
        self._tf, self._arrays = None, {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tf"], state["_arrays"] = None, {}
        return state

    def __del__(self):
        # A reader dropped without close() must not leak its file handle.
        if getattr(self, "_tf", None) is not None:
            self.close()


# A level stored as one compressed strip (or tile) up to this size is decoded once and kept: each read decoded
# all of it (0.3 s for any read of a 5,100 x 4,600 deflate strip). Larger ones are read through zarr, as before.
ONE_CHUNK_KEPT = 256 << 20


def _level_array(tf, path: Path, series: int, level: int, white):
    """What a level's reads slice: a memory map where its samples lie uncompressed in one run (ImageJ and many
    converters write whole images as raw strips; through zarr a read decoded every strip it touched, up to the
    whole image), the decoded level where it is one compressed chunk of up to `ONE_CHUNK_KEPT`, else a zarr
    array over tifffile's chunks, whose missing (sparse) tiles read as white background, as OpenSlide shows them."""
    lvl = tf.series[series].levels[level]
    if lvl.dataoffset is not None and lvl.dtype is not None:
        return np.memmap(path, np.dtype(tf.byteorder + lvl.dtype.char), "r", lvl.dataoffset, lvl.shape, "C")
    page = lvl.keyframe
    if len(lvl.pages) == 1 and len(page.dataoffsets) == 1 and page.databytecounts[0] > 0 \
            and lvl.nbytes <= ONE_CHUNK_KEPT:
        return lvl.asarray()
    import zarr

    return zarr.open_array(tf.series[series].aszarr(level=level, fillvalue=white), mode="r")


def _samples(arr, axes: str, x: int, y: int, w: int, h: int) -> np.ndarray:
    """A region's raw samples as H x W (x samples or channels); of other axes (time, focal plane...) the first."""
    index = []
    for ax in axes:
        if ax == "Y":
            index.append(slice(y, y + h))
        elif ax == "X":
            index.append(slice(x, x + w))
        elif ax in "SC":
            index.append(slice(None))
        else:
            index.append(0)
    kept = [ax for ax in axes if ax in "YXSC"]
    order = [kept.index("Y"), kept.index("X")] + [i for i, ax in enumerate(kept) if ax in "SC"]
    if isinstance(arr, np.ndarray):  # a memory map or a kept level: a copy, native byte order, the caller's own
        return np.array(arr[tuple(index)], dtype=arr.dtype.newbyteorder("=")).transpose(order)
    return np.asarray(arr[tuple(index)]).transpose(order)


def _cmyk_to_rgb(tile: np.ndarray) -> np.ndarray:
    """Ink amounts (C, M, Y, K and any extra samples) as RGB, without a colour profile: R = (1 - C)(1 - K)."""
    top = float(np.iinfo(tile.dtype).max) if tile.dtype.kind == "u" else 1.0
    ink = tile[..., :4].astype(np.float32) / top
    rgb = 255.0 * (1.0 - ink[..., :3]) * (1.0 - ink[..., 3:4])
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _colours(path: Path, page, info: _TiffInfo) -> None:
    """How the samples of `page` (the slide's level 0) read as RGB; a photometric interpretation this does not
    convert is refused by name rather than shown as wrong colours."""
    import tifffile

    kind = tifffile.PHOTOMETRIC
    photometric = page.photometric
    if photometric == kind.PALETTE:
        if page.colormap is None:
            raise CorruptSlide(path, "a palette TIFF without its colour map")
        cmap = np.asarray(page.colormap)
        info.colours = "palette"  # the colour map is 16 bits a channel by the TIFF spec; some writers put 8
        info.palette = np.ascontiguousarray((cmap >> 8 if cmap.max() > 255 else cmap).astype(np.uint8).T)
    elif photometric == kind.MINISWHITE:
        info.colours = "inverted"
    elif photometric == kind.SEPARATED:
        inkset = page.tags.get("InkSet")
        if (inkset is not None and inkset.value != 1) or page.samplesperpixel - len(page.extrasamples) != 4:
            raise UnsupportedFormat(path, "separated (ink) TIFF that is not CMYK: convert it to RGB")
        info.colours = "cmyk"
    elif photometric not in (kind.MINISBLACK, kind.RGB, kind.YCBCR):
        name = getattr(photometric, "name", photometric)
        raise UnsupportedFormat(path, f"TIFF photometric interpretation {name} is not read: convert it to RGB")


def _top(tf, info: _TiffInfo, path: Path) -> float | None:
    """The sample value read as 255 for float and signed samples (module docstring); None for unsigned ones."""
    series = tf.series[info.series]
    if not needs_range(series.dtype):
        return None
    tags = series.levels[0].keyframe.tags
    stated = [tags.get(name) for name in ("SMinSampleValue", "SMaxSampleValue")]
    # one value per sample, or one for all
    span = None if None in stated else (float(np.min(stated[0].value)), float(np.max(stated[1].value)))
    if span is None or not np.isfinite(span).all():
        import zarr

        last = len(series.levels) - 1
        arr = zarr.open_array(series.aszarr(level=last, fillvalue=0), mode="r")  # 0: missing tiles say nothing
        span = sample_range(*(_samples(arr, info.axes[last], *win)
                              for win in peek_windows(*info.level_dimensions[last])))
    return sample_top(path, series.dtype, *span)


def _plain_tiled_page(level, axes: str):
    """The one tiled page of a pyramid level whose tiles decode to H x W x 3 uint8 as they are, else None."""
    import tifffile

    if axes != "YXS" or len(level.pages) != 1 or not isinstance(level.pages[0], tifffile.TiffPage):
        return None
    page = level.pages[0]
    plain = (page.is_tiled and not page.is_ndpi and page.dtype == np.uint8 and page.samplesperpixel == 3
             and page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
             and page.planarconfig == tifffile.PLANARCONFIG.CONTIG and page.imagedepth == 1)
    return page if plain else None


def _describe(tf, path: Path) -> _TiffInfo:
    if not tf.series:
        raise UnsupportedFormat(path, "TIFF holds no image")
    index = _main_series(tf)
    series = tf.series[index]
    levels, axes = [], []
    for level in series.levels:
        ax = level.axes.upper()  # e.g. 'YXS' interleaved RGB, 'SYX' planar, 'CYX' OME channels
        if "Y" not in ax or "X" not in ax:
            raise UnsupportedFormat(path, f"TIFF image has no 2D plane (axes {level.axes})")
        _check_compression(path, level.keyframe.compression)
        levels.append((level.shape[ax.index("X")], level.shape[ax.index("Y")]))
        axes.append(ax)
    warn_unread_planes(path, axes[0], series.levels[0].shape)
    page = series.levels[0].keyframe
    info = _TiffInfo(level_dimensions=levels, axes=axes, series=index)
    info.vendor = next((name for flag, name in _VENDORS if getattr(tf, flag, False)), "generic-tiff")
    info.associated = sorted((s.name or f"image-{i}").lower() for i, s in enumerate(tf.series) if i != index)
    info.properties = _properties(tf, page, series)
    _colours(path, page, info)
    _resolve_mpp(tf, page, info, path)
    return info


def _check_compression(path: Path, code) -> None:
    import tifffile

    if not isinstance(code, tifffile.COMPRESSION):
        raise CorruptSlide(path, f"unknown TIFF compression code {int(code)}")
    if code in tifffile.TIFF.DECOMPRESSORS:
        return
    if not module_available("imagecodecs"):
        raise missing_backend(path, "imagecodecs", f"needed to decode {code.name} tiles")
    raise UnsupportedFormat(path, f"the installed imagecodecs cannot decode TIFF compression {code.name}")


def _properties(tf, page, series) -> dict[str, str]:
    props = {"tifffile.series-kind": str(series.kind)}
    for name in _TAGS:
        tag = page.tags.get(name)
        if tag is not None:
            value = tag.value
            props[f"tiff.{name}"] = str(int(value) if name == "ResolutionUnit" else value)
    if tf.is_svs:
        props.update({f"aperio.{k}": v for k, v in _svs_fields(page.description).items()})
    ndpi = getattr(page, "ndpi_tags", None) or {}
    for key, value in ndpi.items():
        if isinstance(value, str | int | float) and len(str(value)) < 200:
            props[f"hamamatsu.{key}"] = str(value)
    return props


def _svs_fields(description: str) -> dict[str, str]:
    """'Aperio Image Library ...|AppMag = 20|MPP = 0.4990' -> {'AppMag': '20', 'MPP': '0.4990'}."""
    fields = {}
    for part in description.split("|")[1:]:
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _resolve_mpp(tf, page, info: _TiffInfo, path: Path) -> None:
    """The first stated resolution wins (OME metadata, SVS description, resolution tags), else objective."""
    props = info.properties
    candidates: list[tuple[float | None, str]] = []
    if tf.is_ome:
        stated_um, power, y_um = _ome_resolution(tf.ome_metadata, info.series, tf.series[info.series].name)
        if stated_um is not None:
            props[OME_STATED_UM] = f"{stated_um:.6g}"
        warn_non_square(path, props, plausible_mpp(stated_um), plausible_mpp(y_um))
        candidates.append((plausible_mpp(stated_um), "ome-metadata"))
        info.objective_power = power
    if tf.is_svs:
        candidates.append((plausible_mpp(props.get("aperio.MPP")), "vendor-metadata"))
        info.objective_power = info.objective_power or _positive(props.get("aperio.AppMag"))
    if tf.is_ndpi:
        info.objective_power = info.objective_power or _positive(props.get("hamamatsu.Magnification"))
    xres, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if xres is not None and unit is not None:
        candidates.append((mpp_from_tiff_resolution(xres.value, int(unit.value)), "tiff-resolution"))
    if xres is not None and tf.is_imagej and (unit is None or int(unit.value) == 1):
        candidates.append((_imagej_mpp(xres.value, tf.imagej_metadata or {}), "imagej-metadata"))
    for mpp, source in candidates:
        if mpp is not None:
            info.mpp, info.mpp_source = mpp, source
            yres = page.tags.get("YResolution")
            if source == "tiff-resolution" and yres is not None:
                warn_non_square(path, props, mpp, mpp_from_tiff_resolution(yres.value, int(unit.value)))
            return
    if info.objective_power is not None:
        info.mpp = mpp_from_objective(info.objective_power)
        info.mpp_source = "objective-power" if info.mpp is not None else "none"


def _imagej_mpp(xres, metadata: dict) -> float | None:
    """ImageJ (and Fiji, QuPath's ImageJ TIFF) calibrate pixels in their description's `unit` ("micron", "nm"...)
    with ResolutionUnit none: XResolution is then pixels per that unit."""
    try:
        pixels = float(xres[0]) / float(xres[1]) if isinstance(xres, tuple) else float(xres)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    unit = str(metadata.get("unit", "")).replace("\\u00B5", "µ").replace("\\u00b5", "µ")  # ImageJ escapes µ
    return plausible_mpp(length_to_um(1.0 / pixels, unit)) if pixels > 0 else None


def _main_series(tf) -> int:
    """The slide among a TIFF's images: the largest plane. Scanners write it first, but converters may put a macro
    or label image before it (an OME-TIFF), which would then be analysed as the slide."""
    def area(series) -> int:
        ax, shape = series.axes.upper(), series.shape
        return shape[ax.index("Y")] * shape[ax.index("X")] if "Y" in ax and "X" in ax else 0

    sizes = [area(s) for s in tf.series]
    return sizes.index(max(sizes))


def _ome_resolution(xml: str | None, index: int = 0, name: str | None = None) -> tuple[float | None, ...]:
    """(pixel size in um as stated, objective power, the pixel height in um) of the slide's image in OME-XML: the
    `<Image>` named like its series, else the `index`-th (another image's pixel size, a macro's, says nothing of
    the slide's). PhysicalSizeX defaults to micrometres; the objective is the one the image's ObjectiveSettings
    names."""
    if not xml:
        return None, None, None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None, None
    images = [el for el in root.iter() if _tag(el) == "Image"]
    named = [im for im in images if name and im.get("Name") == name]
    image = named[0] if len(named) == 1 else images[index] if index < len(images) else None
    if image is None:
        return None, None, None
    mpp = power = y_um = None
    for el in image.iter():
        if _tag(el) == "Pixels" and el.get("PhysicalSizeX") is not None:
            mpp = length_to_um(el.get("PhysicalSizeX"), el.get("PhysicalSizeXUnit", "µm"))
            if el.get("PhysicalSizeY") is not None:
                y_um = length_to_um(el.get("PhysicalSizeY"), el.get("PhysicalSizeYUnit", "µm"))
            break
    wanted = next((el.get("ID") for el in image.iter() if _tag(el) == "ObjectiveSettings"), None)
    objectives = [el for el in root.iter() if _tag(el) == "Objective"]
    if wanted is not None:
        objectives = [el for el in objectives if el.get("ID") == wanted]
    if len(objectives) == 1:  # the image's own, or the file's only one
        power = _positive(objectives[0].get("NominalMagnification"))
    return mpp, power, y_um


def _tag(el) -> str:
    """An XML element's tag without its namespace."""
    return el.tag.rsplit("}", 1)[-1]


def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None
