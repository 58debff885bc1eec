"""A slide's cell features on disk, in the formats `extract --format` writes.

- `zarr`: DIR/<slide>.zarr, the feature store (`pipeline.store`); what `train mil` and the recipe read.
- `h5`: DIR/h5_files/<slide>.h5, as CLAM's and TRIDENT's feature files: `features` (n, F) float32 and `coords`
  (n, 2) int64, each cell's top-left (x, y) in level-0 px; `coords` carries `patch_size` (the cell's side at the
  analysis resolution), `patch_size_level0` (that side in level-0 px, rounded) and `cell_px0` (the same, exact:
  cells lie at round(i * cell_px0), so the level-0 steps between them can differ by 1 px). Also `coords_um`,
  `tissue`, `region_id`, and the store's attributes on the file (number lists as arrays, None as "", other
  lists and dicts as JSON; the whole set as JSON in `wsi_vssm_attrs`).
- `pt`: DIR/pt_files/<slide>.pt, as CLAM's pt_files: the features alone, one float32 tensor (n, F).

Rows are in the store's order (sorted by y, then x). Each file is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from wsi_vssm.atomic import atomic_file, in_the_way, prove_writable, to_jsonable
from wsi_vssm.pipeline.store import COMPLETE_ATTR, CellFeatures, FeatureStore, store_complete

FORMATS = ("zarr", "h5", "pt")
FOLDERS = {"h5": "h5_files", "pt": "pt_files"}  # beside the stores, as CLAM names them
STORE_ONLY_ATTRS = ("format", COMPLETE_ATTR)  # the zarr store's own marks: not the h5 file's


def check_formats(formats) -> tuple[str, ...]:
    """`formats` in FORMATS' order, once each (so the order given does not matter); empty or unknown refused."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ValueError(f"feature formats must be some of {', '.join(FORMATS)}, got {list(formats)!r}")
    return tuple(f for f in FORMATS if f in formats)


def feature_file(out: str | os.PathLike, name: str, fmt: str) -> Path:
    """Where `extract` writes slide `name`'s features in format `fmt`."""
    check_formats([fmt])
    if fmt == "zarr":
        return Path(out) / f"{name}.zarr"
    return Path(out) / FOLDERS[fmt] / f"{name}.{fmt}"


def write_feature_file(path: str | os.PathLike, cells: CellFeatures, fmt: str) -> None:
    check_formats([fmt])
    if fmt == "zarr":
        FeatureStore.write(path, cells)
        return
    with atomic_file(path) as tmp:
        (_write_h5 if fmt == "h5" else _write_pt)(tmp, cells)


def feature_file_ok(path: str | os.PathLike, fmt: str) -> bool:
    """Whether a finished file of `fmt` is at `path`: it opens and holds features (a pt file is mapped, not read)."""
    check_formats([fmt])
    try:
        if fmt == "zarr":
            return store_complete(path)
        if fmt == "h5":
            import h5py

            with h5py.File(path, "r") as f:
                return f["features"].ndim == 2 and f["coords"].shape == (f["features"].shape[0], 2)
        import torch

        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).ndim == 2
    except Exception:  # missing, truncated, foreign or damaged (FeatureStoreError too): the slide is redone
        return False


def _write_h5(path: Path, cells: CellFeatures) -> None:
    import h5py

    attrs = {k: v for k, v in to_jsonable(cells.attrs).items() if k not in STORE_ONLY_ATTRS}
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.asarray(cells.features, np.float32))
        coords = f.create_dataset("coords", data=np.asarray(cells.coords_px, np.int64))
        coords.attrs["patch_size"] = int(attrs.get("token_px", 0))
        coords.attrs["patch_size_level0"] = int(round(float(attrs.get("cell_px0", 0))))
        coords.attrs["cell_px0"] = float(attrs.get("cell_px0", 0))
        f.create_dataset("coords_um", data=np.asarray(cells.coords_um, np.float32))
        f.create_dataset("tissue", data=np.asarray(cells.tissue, np.float32))
        f.create_dataset("region_id", data=np.asarray(cells.region_id, np.int32))
        for key, value in attrs.items():
            f.attrs[key] = _h5_attr(value)
        f.attrs["wsi_vssm_attrs"] = json.dumps(attrs)


def _h5_attr(value):
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return np.asarray(value) if all(isinstance(v, (int, float)) for v in value) else json.dumps(value)
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def _write_pt(path: Path, cells: CellFeatures) -> None:
    import torch

    torch.save(torch.from_numpy(np.asarray(cells.features, np.float32)), path)


def prepare_folders(out: str | os.PathLike, formats) -> None:
    """Create the h5 / pt folders and prove they can be written, before any slide runs (a file in the way, or a
    read-only folder, failed every slide only after its backbone pass). OSError with a one-line message."""
    for fmt in check_formats(formats):
        if fmt == "zarr":
            continue
        d = Path(out) / FOLDERS[fmt]
        what = in_the_way(d)
        if what:
            raise OSError(f"{d} is {what}, not a folder: --format {fmt} writes its files there; move it away or use "
                          "another --out")
        try:
            prove_writable(d)
        except OSError as e:
            raise OSError(f"{d}: cannot write there ({e.strerror or e})") from e
