"""The OME-Zarr backend: an NGFF `multiscales` image in a zarr v2 (.zattrs) or v3 (zarr.json) directory.

Levels are the multiscale datasets, finest first. The resolution is the dataset's `scale` transformation on
the x axis, in micrometres when the axis names a length unit; without a unit there is no physical resolution.
Beyond y and x, the first time point and focal plane are read; channels go through `channels_to_rgb`. Float
and signed samples are read in the range `formats.sample_top` picks from the finite values of the coarsest level
(`formats.peek_windows`: all of it up to 1,024 px a side, else windows spread over it; NaN reads as white).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from wsi_vssm.errors import one_line
from wsi_vssm.io.base import OME_STATED_UM, UNITLESS_SCALE, SlideReader
from wsi_vssm.io.errors import CorruptSlide, UnsupportedFormat
from wsi_vssm.io.formats import (
    channels_to_rgb,
    is_zarr_array_dir,
    is_zarr_dir,
    length_to_um,
    missing_backend,
    needs_range,
    peek_windows,
    plausible_mpp,
    sample_range,
    sample_top,
    warn_non_square,
    warn_unread_planes,
)
from wsi_vssm.io.zarr_meta import zarr_attrs_on_disk

_DEFAULT_AXES = ("t", "c", "z", "y", "x")  # NGFF 0.1-0.3 without an `axes` list
# A chunk is decoded whole to read any pixel of it: a 2.6 MB store whose one chunk decodes to 2.7 GB took 5.6 GB
# and minutes for `info` (and again for each block of its thumbnail). Slide stores chunk at 256-4,096 px (3-50 MB).
MAX_CHUNK_BYTES = 512 * 2**20


def _check_chunks(path: Path, arrays) -> None:
    for array in arrays:
        size = int(np.prod(array.chunks, dtype=np.int64)) * array.dtype.itemsize
        if size > MAX_CHUNK_BYTES:
            raise CorruptSlide(path, f"its chunks {tuple(array.chunks)} decode to {size / 2**20:,.0f} MiB each, more "
                                     f"than this reader takes ({MAX_CHUNK_BYTES // 2**20} MiB): rechunk the store")


class ZarrSlide(SlideReader):
    backend = "zarr"

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        group = _open_group(path)
        try:
            prefix, meta = _image(path, group)
            axes = _axes(meta)
            shapes = [group[prefix + d["path"]].shape for d in meta["datasets"]]
        except (UnsupportedFormat, CorruptSlide):
            raise
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as err:
            raise CorruptSlide(path, f"malformed OME-NGFF metadata: {one_line(err)}") from err
        names = [_role(a) for a in axes]
        if "y" not in names or "x" not in names or any(len(s) != len(names) for s in shapes) or not shapes:
            raise CorruptSlide(path, f"OME-NGFF datasets do not match their axes {names}")
        warn_unread_planes(path, "".join(n[:1] for n in names), shapes[0])
        _check_chunks(path, [group[prefix + d["path"]] for d in meta["datasets"]])
        self._names = names
        self._paths = [prefix + d["path"] for d in meta["datasets"]]
        try:
            scale = _scale(meta, names.index("x"))
        except (TypeError, ValueError, IndexError, AttributeError) as err:
            raise CorruptSlide(path, f"malformed OME-NGFF scale: {one_line(err)}") from err
        unit = axes[names.index("x")].get("unit")
        stated_um = None if scale is None else length_to_um(scale, unit)
        try:
            y_scale = _scale(meta, names.index("y"))
        except (TypeError, ValueError, IndexError, AttributeError):
            y_scale = None  # x's scale decides; a broken y scale only goes unchecked
        y_um = None if y_scale is None else length_to_um(y_scale, axes[names.index("y")].get("unit"))
        properties = {"ome-zarr.axes": "".join(names), "ome-zarr.version": str(meta.get("version", ""))}
        if stated_um is not None:
            properties[OME_STATED_UM] = f"{stated_um:.6g}"
        elif scale is not None:  # a scale in pixels, or none named: no physical resolution, and the hint says why
            where = "with no unit" if unit is None else f"in {unit!r}, not a length"
            properties[UNITLESS_SCALE] = f"{scale:.6g} {where}"
        warn_non_square(path, properties, plausible_mpp(stated_um), plausible_mpp(y_um))
        super().__init__(
            path,
            [(s[names.index("x")], s[names.index("y")]) for s in shapes],
            mpp=plausible_mpp(stated_um),
            mpp_source="ome-metadata",
            vendor="ome-zarr",
            properties=properties,
        )
        self._group, self._pid = group, os.getpid()
        coarsest, self._top = group[self._paths[-1]], None  # the sample value read as 255 (tiff_backend's rule)
        if needs_range(coarsest.dtype):
            h, w = (shapes[-1][names.index(a)] for a in "yx")
            try:
                span = sample_range(*(self._samples(coarsest, *win) for win in peek_windows(w, h)))
            except MemoryError:
                raise
            except Exception as err:  # a broken chunk: decoders differ in what they raise
                raise CorruptSlide(path, f"cannot read its coarsest level: {one_line(err)}") from err
            self._top = sample_top(path, coarsest.dtype, *span)

    def _array(self, level: int):
        if self._group is None or self._pid != os.getpid():
            self._group, self._pid = _open_group(self.path), os.getpid()
        return self._group[self._paths[level]]

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return channels_to_rgb(self._samples(self._array(level), x, y, w, h), samples=False, top=self._top)

    def _samples(self, arr, x: int, y: int, w: int, h: int) -> np.ndarray:
        """A region's raw values as H x W (x C): of time and z, the first plane."""
        index: list[int | slice] = []
        for name in self._names:
            if name == "y":
                index.append(slice(y, y + h))
            elif name == "x":
                index.append(slice(x, x + w))
            elif name == "c":
                index.append(slice(None))
            else:  # time and z: the first plane
                index.append(0)
        kept = [n for n in self._names if n in ("y", "x", "c")]
        order = [kept.index("y"), kept.index("x")] + ([kept.index("c")] if "c" in kept else [])
        return np.asarray(arr[tuple(index)]).transpose(order)

    def close(self) -> None:
        self._group = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_group"] = None
        return state


def _open_group(path: Path):
    try:
        import zarr
    except ImportError as err:
        raise missing_backend(path, "zarr", one_line(err)) from err
    if path.is_dir() and is_zarr_array_dir(path):
        # a converter's whole store first (it names the slide), else the image
        above = {p: zarr_attrs_on_disk(p) for p in path.parents[:3]}
        holder = next((p for p, a in above.items() if a.get("bioformats2raw.layout") is not None),
                      next((p for p, a in above.items() if _multiscales(a)), None))
        hint = f"give the image's folder, {holder}" if holder else "give the folder of the image that holds it"
        raise UnsupportedFormat(path, f"one array of a zarr store (a pyramid level?), not an image: {hint}")
    if not path.is_dir() or not is_zarr_dir(path):
        raise UnsupportedFormat(path, "not an OME-Zarr directory (no .zattrs or zarr.json)")
    try:
        return zarr.open_group(os.fspath(path), mode="r")
    except (ValueError, KeyError, TypeError) as err:  # unreadable zarr.json / .zgroup
        raise CorruptSlide(path, f"broken zarr metadata: {one_line(err)}") from err
    except (OSError, zarr.errors.GroupNotFoundError) as err:
        raise UnsupportedFormat(path, f"not a zarr group: {one_line(err)}") from err


def _image(path: Path, group) -> tuple[str, dict]:
    """(path prefix of the image's arrays, its `multiscales` entry): the group's own image, or in the
    bioformats2raw layout (bioformats2raw, Glencoe, IDR: a top group whose series are sub-groups `0`, `1`, ...)
    its largest series (a converter may put a macro or label image first), with one warning when there are
    more."""
    attrs = group.attrs.asdict()
    multiscales = _multiscales(attrs)
    layout = attrs.get("bioformats2raw.layout") or attrs.get("ome", {}).get("bioformats2raw.layout")
    if multiscales or layout is None:
        if not multiscales:
            inner = sorted(k for k in group.group_keys() if _multiscales(group[k].attrs.asdict()))
            hint = f"; its sub-group '{inner[0]}' holds an image: give {path / inner[0]}" if inner else ""
            raise UnsupportedFormat(path, f"zarr store without OME-NGFF 'multiscales' metadata{hint}")
        return "", multiscales[0]
    series = sorted((k for k in group.group_keys() if k.isdigit()), key=int)
    sizes = {k: _plane_area(group, k) for k in series}
    if not series or max(sizes.values()) <= 0:
        raise UnsupportedFormat(path, "bioformats2raw layout without an OME-NGFF image in its series")
    main = max(series, key=lambda k: sizes[k])  # the first of equals
    if len(series) > 1:
        import warnings

        warnings.warn(f"{path}: holds {len(series)} images (bioformats2raw series); reading series {main}, the "
                      "largest", UserWarning, stacklevel=4)
    return f"{main}/", _multiscales(group[main].attrs.asdict())[0]


def _multiscales(attrs: dict) -> list:
    return attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales") or []


def _plane_area(group, key: str) -> int:
    """Level 0's y x x size of the series group `key`; 0 when it holds no readable image."""
    try:
        meta = _multiscales(group[key].attrs.asdict())[0]
        roles = [_role(a) for a in _axes(meta)]
        shape = group[f"{key}/{meta['datasets'][0]['path']}"].shape
        return int(shape[roles.index("y")] * shape[roles.index("x")])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return 0


def _role(axis: dict) -> str:
    """An axis's role in reading: `c` for any channel axis (NGFF marks it by type; its name is free: `channel`
    was read as a time axis, its first channel as grey), else its lower-case name (`y`, `x`, `t`, `z`, ...)."""
    name = str(axis["name"]).lower()
    return "c" if axis.get("type") == "channel" or name == "c" else name


def _axes(meta: dict) -> list[dict]:
    axes = meta.get("axes") or list(_DEFAULT_AXES)
    # NGFF 0.3 lists bare names, 0.4+ objects with name / type / unit.
    return [a if isinstance(a, dict) else {"name": str(a)} for a in axes]


def _scale(meta: dict, x_axis: int) -> float | None:
    """An axis's scale at level 0 (dataset scale times any multiscale-wide scale); None when none is given."""
    scale = 1.0
    transforms = list(meta["datasets"][0].get("coordinateTransformations") or [])
    transforms += list(meta.get("coordinateTransformations") or [])
    found = False
    for t in transforms:
        if t.get("type") == "scale" and "scale" in t:
            scale *= float(t["scale"][x_axis])
            found = True
    return scale if found else None
