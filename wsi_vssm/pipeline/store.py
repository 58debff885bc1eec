"""FeatureStore: one slide's token cells in a zarr v3 group (written atomically, read lazily)."""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_vssm.errors import WsiVssmError, one_line
from wsi_vssm.outputs.files import ALL_CHUNKS, missing_chunks, zarr_root_attrs

STORE_FORMAT = "wsi-vssm-features/1"
ARRAYS = ("features", "coords_px", "coords_um", "region_id", "tissue")
COMPLETE_ATTR = ALL_CHUNKS  # stores that hold every chunk say so (outputs.files)
CHUNK_ROWS = 65536  # cells a chunk holds, as stores are written; a chunk is decoded whole to read any of it
# More cells than a slide gives (a 200,000 px side at 0.25 um/px in 32 px cells: 39 M cells, tissue or not):
# a store's metadata declaring more is refused before anything is read (20 M cells asked 9.5 GiB)
MAX_STORE_CELLS = 1 << 26


def is_feature_store(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding a feature store (by its root attributes; nothing is opened)."""
    p = Path(path)
    return p.is_dir() and (zarr_root_attrs(p) or {}).get("format") == STORE_FORMAT


def holds_feature_stores(path: str | os.PathLike) -> bool:
    """Whether folder `path` is an `extract --out` folder: feature stores, or its h5_files / pt_files folders."""
    p = Path(path)
    return p.is_dir() and (any(is_feature_store(c) for c in p.glob("*.zarr"))
                           or (p / "h5_files").is_dir() or (p / "pt_files").is_dir())


def store_complete(path: str | os.PathLike) -> bool:
    """Whether a finished, undamaged feature store is at `path`: its format, its arrays' shapes and every chunk,
    as `FeatureStore.open` checks them. A store that says it holds every chunk is checked from its metadata files
    and a stat of each chunk (under 1 ms; opening it through zarr takes about 7, which a rerun of `extract` paid
    per slide), so metadata zarr cannot decode (an unknown codec) is found only when the store is read; others
    are opened."""
    verdict = _complete_on_disk(Path(path))
    if verdict is not None:
        return verdict
    try:
        FeatureStore.open(path)
        return True
    except FeatureStoreError:
        return False


def _complete_on_disk(path: Path) -> bool | None:
    """True or False from the zarr v3 metadata files alone; None where they say something this does not read."""
    attrs = zarr_root_attrs(path) if (path / "zarr.json").is_file() else None  # a v3 group, as stores are
    if attrs is None or attrs.get("format") != STORE_FORMAT:
        return False
    if not attrs.get(COMPLETE_ATTR):
        return None  # written before stores said so: only opening them checks their chunks
    try:
        metas = {name: json.loads((path / name / "zarr.json").read_text(encoding="utf-8")) for name in ARRAYS}
    except (OSError, ValueError, AttributeError):  # missing, unreadable or not JSON objects: damaged
        return False
    try:
        shapes = {name: [int(n) for n in meta["shape"]] for name, meta in metas.items()}
        if len(shapes["features"]) != 2 or len({shape[0] for shape in shapes.values()}) != 1:
            return False
        chunks = {name: _chunk_shape(meta) for name, meta in metas.items()}
        counts = {name: [-(-size // step) for size, step in zip(shapes[name], chunks[name], strict=True)]
                  for name in ARRAYS}
        # the bounds FeatureStore.open checks, before a hostile store's millions of chunks are stat'ed
        if not _within_bounds(attrs, shapes["features"][0], max(c[0] for c in chunks.values()),
                              max(math.prod(c) for c in counts.values())):
            return False
        return all(_chunks_on_disk(path / name, counts[name], metas[name]) for name in ARRAYS)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):  # a metadata layout this does not know: zarr judges
        return None


def _chunk_shape(meta: dict) -> list[int]:
    if meta["chunk_grid"]["name"] != "regular":
        raise ValueError("chunk grid")
    chunk = [int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"]]
    if min(chunk, default=0) < 1:
        raise ValueError("chunk shape")
    return chunk


def _within_bounds(attrs: dict, cells: int, chunk_rows: int, chunks: int) -> bool:
    """Whether a store of `cells` cells in `chunks` chunks of `chunk_rows` is one this package could have written
    for the slide its attributes describe."""
    most = min(MAX_STORE_CELLS, _grid_cells(attrs) or MAX_STORE_CELLS)
    return cells <= most and chunk_rows <= CHUNK_ROWS and chunks <= MAX_STORE_CELLS // CHUNK_ROWS


def _grid_cells(attrs: dict) -> int | None:
    """How many cells the slide `attrs` describe has room for (`dims`, level-0 px; `cell_px0`), or None."""
    try:
        (w, h), cell = (float(v) for v in attrs["dims"]), float(attrs["cell_px0"])
        return int((w / cell + 1) * (h / cell + 1)) if cell > 0 and w >= 0 and h >= 0 else None
    except (KeyError, TypeError, ValueError, OverflowError):
        return None


def _chunks_on_disk(folder: Path, counts: list[int], meta: dict) -> bool:
    encoding = meta["chunk_key_encoding"]
    if encoding["name"] == "default":
        prefix, separator = ["c"], (encoding.get("configuration") or {}).get("separator", "/")
    elif encoding["name"] == "v2":
        prefix, separator = [], (encoding.get("configuration") or {}).get("separator", ".")
    else:
        raise ValueError("chunk key encoding")
    return all((folder / separator.join(prefix + [str(i) for i in index])).is_file()
               for index in itertools.product(*(range(n) for n in counts)))


def _identity(path: Path) -> tuple | None:
    """The store folder's and its features array folder's (device, inode): another after a rename or rewrite.
    Where a file system's inode numbers are not stable (CIFS mounted `noserverino`), a store could be refused as
    replaced when it was not; reading it again opens it afresh."""
    try:
        return tuple((st.st_dev, st.st_ino) for st in (os.stat(path), os.stat(path / "features")))
    except OSError:
        return None


_MOVED = ("moved, deleted or replaced since it was opened (an extract at work on it?); run again once that is "
          "done")


class FeatureStoreError(WsiVssmError):
    """A feature store that cannot be read or written; the message names the store."""


@dataclass
class CellFeatures:
    """The cells of one slide. Rows are sorted by (y, x)."""

    features: np.ndarray  # (n, F) float16
    coords_px: np.ndarray  # (n, 2) int64: each cell's top-left (x, y) in level-0 px
    coords_um: np.ndarray  # (n, 2) float32: the same in um (level-0 px x slide_mpp)
    region_id: np.ndarray  # (n,) int32: the RegionGrid index the cell was taken from
    tissue: np.ndarray  # (n,) float16: tissue fraction of the cell
    attrs: dict = field(default_factory=dict)
    # (n, F) float16 or None: under TTA, the untransformed view's features, for the domain check (not stored)
    view_features: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])


class FeatureStore:
    """One slide's cells in a zarr v3 group. Arrays (`features`, `coords_px`, `coords_um`, `region_id`,
    `tissue`) are zarr arrays read on demand; `attrs` is a plain dict; `load()` reads everything."""

    def __init__(self, path: Path, group):
        self.path = path
        self._group = group
        self.attrs = dict(group.attrs)
        self._identity = _identity(path)

    # -- writing
    @classmethod
    def write(cls, path: str | os.PathLike, cells: CellFeatures) -> FeatureStore:
        """Write `cells` to `path` (a directory, usually `<slide>.zarr`) atomically: built beside it, renamed."""
        import zarr

        from wsi_vssm.atomic import atomic_dir, to_jsonable

        path = Path(path)
        try:
            with atomic_dir(path) as tmp:
                group = zarr.open_group(tmp, mode="w", zarr_format=3)
                group.attrs.update({**to_jsonable(cells.attrs), COMPLETE_ATTR: True})
                for name in ARRAYS:
                    data = np.ascontiguousarray(getattr(cells, name))
                    chunks = (max(1, min(len(data), CHUNK_ROWS)),) + data.shape[1:]
                    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                                             config={"write_empty_chunks": True})
                    if data.size:
                        arr[...] = data
        except OSError as e:
            raise FeatureStoreError(f"{path}: cannot write the feature store: {e.strerror or e}") from e
        return cls.open(path)

    # -- reading
    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        """Open a store lazily; a missing, foreign or damaged store raises FeatureStoreError (one line)."""
        import zarr

        path = Path(path)
        if not path.is_dir():
            raise FeatureStoreError(f"{path}: no feature store here")
        try:
            group = zarr.open_group(path, mode="r", zarr_format=3)
            store = cls(path, group)
            arrays = {name: group[name] for name in ARRAYS}
        except Exception as e:  # zarr has no common base for a broken store (KeyError, JSON, metadata errors...)
            raise FeatureStoreError(f"{path}: damaged feature store ({type(e).__name__}: {one_line(e)})") from e
        store._check(arrays)
        store._arrays = arrays
        return store

    def _check(self, arrays) -> None:
        if self.attrs.get("format") != STORE_FORMAT:
            raise FeatureStoreError(f"{self.path}: not a wsi-vssm feature store (format {self.attrs.get('format')!r})")
        n = arrays["features"].shape[0]
        if any(arrays[a].shape[0] != n for a in ARRAYS) or arrays["features"].ndim != 2:
            shapes = {a: arrays[a].shape for a in ARRAYS}
            raise FeatureStoreError(f"{self.path}: damaged feature store (inconsistent array shapes {shapes})")
        rows = max(arrays[a].chunks[0] for a in ARRAYS)
        most = min(MAX_STORE_CELLS, _grid_cells(self.attrs) or MAX_STORE_CELLS)
        chunks = max(arrays[a].nchunks for a in ARRAYS)  # each is stat'ed to judge the store: a bound on that too
        if not _within_bounds(self.attrs, n, rows, chunks):
            raise FeatureStoreError(f"{self.path}: damaged feature store (it declares {n:,} cells in {chunks:,} "
                                    f"chunks of {rows:,}; its slide has room for {most:,} cells, a store written "
                                    f"here has chunks of up to {CHUNK_ROWS:,} and at most "
                                    f"{MAX_STORE_CELLS // CHUNK_ROWS:,} of them)")
        if self.attrs.get(COMPLETE_ATTR):
            for name in ARRAYS:
                arr = arrays[name]
                if missing_chunks(arr):
                    raise FeatureStoreError(f"{self.path}: damaged feature store ({name}: "
                                            f"{missing_chunks(arr)} of {arr.nchunks} chunks missing)")

    def __getattr__(self, name):
        if name in ARRAYS:
            return self.__dict__["_arrays"][name]
        raise AttributeError(name)

    def __len__(self) -> int:
        return int(self._arrays["features"].shape[0])

    @property
    def name(self) -> str:
        return str(self.attrs.get("slide", self.path.name.removesuffix(".zarr")))

    def load(self) -> CellFeatures:
        """Every array in memory, as a CellFeatures; a chunk that fails to decode raises FeatureStoreError."""
        return CellFeatures(attrs=dict(self.attrs), **self._read(ARRAYS))

    def read_features(self) -> np.ndarray:
        return self._read(("features",))["features"]

    def _read(self, names) -> dict[str, np.ndarray]:
        """The arrays `names`, read whole. zarr reads a chunk that is not there as zeros: a store moved, deleted or
        replaced (an `extract --overwrite` at work) since it was opened is found by its folder's identity after the
        read, not trained on as zeros."""
        try:
            data = {a: np.asarray(self._arrays[a][...]) for a in names}
        except Exception as e:  # codec / missing-chunk errors differ by zarr version
            if _identity(self.path) != self._identity:
                raise FeatureStoreError(f"{self.path}: {_MOVED}") from e
            raise FeatureStoreError(f"{self.path}: damaged feature store ({type(e).__name__}: {one_line(e)})") from e
        if _identity(self.path) != self._identity:
            raise FeatureStoreError(f"{self.path}: {_MOVED}")
        return data

    def __repr__(self) -> str:
        return f"<FeatureStore {self.path} {len(self)} cells model={self.attrs.get('model_id')}>"
