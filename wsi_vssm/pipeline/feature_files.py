"""A slide's cell features in the files other MIL tools read, beside the zarr feature store.

- `h5`: DIR/h5_files/<slide>.h5, as CLAM's and TRIDENT's feature files: `features` (n, F) float32 and `coords`
  (n, 2) int64, each cell's top-left (x, y) in level-0 px; `coords` carries `patch_size` (the cell's side at the
  analysis resolution) and `patch_size_level0`. Also `coords_um`, `tissue`, `region_id`, and the store's
  attributes on the file (lists as arrays, None as "", the whole set as JSON in `wsi_vssm_attrs`).
- `pt`: DIR/pt_files/<slide>.pt, as CLAM's pt_files: the features alone, one float32 tensor (n, F).

Rows are in the store's order (sorted by y, then x). Each file is built in memory and renamed into place.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from wsi_vssm.pipeline.store import CellFeatures

FORMATS = ("zarr", "h5", "pt")
FOLDERS = {"h5": "h5_files", "pt": "pt_files"}


def feature_file(out: str | os.PathLike, name: str, fmt: str) -> Path:
    """Where `extract` writes slide `name`'s features in format `fmt`."""
    if fmt == "zarr":
        return Path(out) / f"{name}.zarr"
    return Path(out) / FOLDERS[fmt] / f"{name}.{fmt}"


def write_feature_file(path: str | os.PathLike, cells: CellFeatures, fmt: str) -> None:
    from wsi_vssm.atomic import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, _h5_bytes(cells) if fmt == "h5" else _pt_bytes(cells))


def feature_file_ok(path: str | os.PathLike, fmt: str) -> bool:
    """Whether a finished file of `fmt` is at `path` (a cheap look: it opens and holds features)."""
    try:
        if fmt == "h5":
            import h5py

            with h5py.File(path, "r") as f:
                return f["features"].ndim == 2 and f["coords"].shape == (f["features"].shape[0], 2)
        import torch

        return torch.load(path, map_location="cpu", weights_only=True).ndim == 2
    except Exception:  # missing, truncated or foreign: the slide is redone
        return False


def _h5_bytes(cells: CellFeatures) -> bytes:
    import h5py

    from wsi_vssm.atomic import to_jsonable

    attrs = to_jsonable(cells.attrs)
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_dataset("features", data=np.asarray(cells.features, np.float32))
        coords = f.create_dataset("coords", data=np.asarray(cells.coords_px, np.int64))
        coords.attrs["patch_size"] = int(attrs.get("token_px", 0))
        coords.attrs["patch_size_level0"] = int(round(float(attrs.get("cell_px0", 0))))
        f.create_dataset("coords_um", data=np.asarray(cells.coords_um, np.float32))
        f.create_dataset("tissue", data=np.asarray(cells.tissue, np.float32))
        f.create_dataset("region_id", data=np.asarray(cells.region_id, np.int32))
        for key, value in attrs.items():
            f.attrs[key] = _h5_attr(value)
        f.attrs["wsi_vssm_attrs"] = json.dumps(attrs)
    return buf.getvalue()


def _h5_attr(value):
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return np.asarray(value) if all(isinstance(v, (int, float)) for v in value) else json.dumps(value)
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def _pt_bytes(cells: CellFeatures) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(torch.from_numpy(np.asarray(cells.features, np.float32)), buf)
    return buf.getvalue()
