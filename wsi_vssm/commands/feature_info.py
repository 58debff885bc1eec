"""`wsi-vssm info` on feature files: a zarr feature store, an h5 feature file (ours, or CLAM's / TRIDENT's: a
`features` and a `coords` dataset) or a pt file holding one features tensor (`extract --format`, docs/features.md).
They were read as slides ("zarr store without OME-NGFF metadata", "not a slide format") or as a model file."""

from __future__ import annotations

import functools
import json
from pathlib import Path

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def feature_kind(path: str) -> str | None:
    """"zarr", "h5" or "pt" when `path` is a feature file of that kind, else None (a slide, a model file...)."""
    p = Path(path)
    if p.is_dir():
        try:
            meta = json.loads((p / "zarr.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # before any import: `info OUT` stays free of numpy and torch
        from wsi_vssm.pipeline.store import STORE_FORMAT

        attrs = meta.get("attributes") if isinstance(meta, dict) else None
        return "zarr" if isinstance(attrs, dict) and attrs.get("format") == STORE_FORMAT else None
    if not p.is_file():  # a pipe or a device would block the read below; the slide readers name those
        return None
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if head == HDF5_MAGIC:
        return "h5"
    if p.suffix.lower() == ".pt" and _tensor(p) is not None:
        return "pt"
    return None


def feature_folder_problem(path: str) -> str | None:
    """For extract's `h5_files/` or `pt_files/` folder, or a folder of feature stores without slide states: one
    line saying what it holds (its pt files were called model files, its h5 files and stores "no slide files");
    None for anything else."""
    p = Path(path)
    fmt = {"h5_files": "h5", "pt_files": "pt"}.get(p.name)  # pipeline.feature_files.FOLDERS, without its imports
    if not p.is_dir():
        return None
    try:
        if fmt is None:  # feature stores copied out of an extract folder (no .state): `train mil` reads such folders
            from wsi_vssm.pipeline.store import is_feature_store

            names = sorted(c.name for c in p.glob("*.zarr") if not c.name.startswith(".") and is_feature_store(c))
            fmt = "zarr"
        else:
            names = sorted(c.name for c in p.iterdir() if c.suffix.lower() == f".{fmt}" and not c.name.startswith("."))
    except OSError:
        return None
    if not names:
        return None
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    what = "feature store(s)" if fmt == "zarr" else f"{fmt} feature file(s)"
    return (f"{path}: a folder of {len(names)} {what} of `wsi-vssm extract` ({shown}), not a slide: give one of "
            "them to `wsi-vssm info`" + ("; `wsi-vssm train mil` reads the folder" if fmt == "zarr" else ""))


def _tensor(path: Path):
    """The file's tensor, or None; `feature_kind` and then `feature_info` ask for it: it is loaded once."""
    try:
        st = path.stat()
    except OSError:
        return None
    return _load_tensor(str(path.resolve()), st.st_ino, st.st_mtime_ns, st.st_size)  # a rewritten file: afresh


@functools.lru_cache(maxsize=1)
def _load_tensor(path: str, inode: int, mtime_ns: int, size: int):
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a model file of another format, or damaged: not ours to describe
        return None
    return obj if isinstance(obj, torch.Tensor) else None


def feature_info(path: str, kind: str) -> dict:
    """The facts `info` prints for a feature file of `kind` (from `feature_kind`); a damaged one is one line."""
    from wsi_vssm.errors import UsageError

    report = {"path": str(path), "kind": kind}
    if kind == "zarr":
        from wsi_vssm.pipeline.store import FeatureStore

        store = FeatureStore.open(path)  # FeatureStoreError: one line naming the store
        attrs = store.attrs
        report.update(cells=len(store), features=int(store.features.shape[1]), dtype=str(store.features.dtype),
                      notes=[])
    elif kind == "h5":
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if not isinstance(f.get("features"), h5py.Dataset):  # missing, or a group of that name
                    raise UsageError(f"{path}: an HDF5 file without a `features` dataset: not a feature file")
                feats = f["features"]
                coords = f.get("coords")
                attrs = {k: _plain(v) for k, v in f.attrs.items() if k != "wsi_vssm_attrs"}
                report.update(_cells(tuple(feats.shape)), dtype=str(feats.dtype),
                              coords=None if coords is None else {k: _plain(v) for k, v in coords.attrs.items()})
                report["notes"] += _coords_notes(coords, report["cells"])
        except OSError as e:
            raise UsageError(f"{path}: cannot read this HDF5 file ({e})") from None
    else:
        t = _tensor(Path(path))
        _load_tensor.cache_clear()  # described: no need to keep the file mapped
        attrs = {}
        report.update(_cells(tuple(t.shape)), dtype=str(t.dtype).removeprefix("torch."))
    if report["cells"] == 0:
        report["notes"].append("no cells: an empty bag (a slide without tissue); `train mil` leaves such slides out "
                               "and other tools' bag loaders may fail on it")
    keys = ("slide", "model_id", "model_hash", "mpp", "slide_mpp", "token_px", "cell_px0", "package_version")
    report.update({k: attrs.get(k) for k in keys if attrs.get(k) not in (None, "")})
    return report


def _cells(shape: tuple) -> dict:
    """Cells and features of a features array of `shape`: (N, F) as written by CLAM, TRIDENT and us; (1, N, F)
    (a leading batch axis some tools keep) counts N cells; any other shape is said, not guessed at."""
    if len(shape) == 2:
        return {"cells": shape[0], "features": shape[1], "notes": []}
    if len(shape) == 3 and shape[0] == 1:
        return {"cells": shape[1], "features": shape[2],
                "notes": [f"features have shape {list(shape)}: a leading batch axis; bag loaders that expect "
                          "(cells, features) read it as one cell"]}
    return {"cells": None, "features": None,
            "notes": [f"features have shape {list(shape)}, not (cells, features): not a bag of cell features"]}


def _coords_notes(coords, cells: int | None) -> list[str]:
    """What is wrong with an h5 file's `coords` for its `cells`: missing, or not one (x, y) row per cell."""
    import h5py

    if coords is None:
        return ["no `coords` dataset: the cells have no positions, so no heatmap or overlay can be drawn from it"]
    if not isinstance(coords, h5py.Dataset):
        return ["`coords` is a group, not a dataset of (x, y) rows: the cells have no positions"]
    shape = tuple(coords.shape)
    if cells is not None and shape != (cells, 2):
        return [f"coords have shape {list(shape)} for {cells} cells: not one (x, y) row per cell, so the positions "
                "do not match the features"]
    return []


def _plain(value):
    return value.tolist() if hasattr(value, "tolist") else value.decode() if isinstance(value, bytes) else value


def format_feature_info(r: dict) -> str:
    what = {"zarr": "a wsi-vssm feature store (train mil reads it)",
            "h5": "an h5 feature file (`features` and `coords`, as CLAM and TRIDENT read them)",
            "pt": "a pt feature file (one features tensor, as CLAM's pt_files)"}[r["kind"]]
    lines = [f"feature file: {r['path']}", f"kind:         {what}",
             f"cells:        {r['cells']} x {r['features']} features ({r['dtype']})" if r["cells"] is not None
             else f"cells:        unknown ({r['dtype']})"]
    if r.get("slide") or r.get("model_id"):
        model = f"model {r.get('model_id')} ({str(r.get('model_hash', ''))[:12]})" if r.get("model_id") else ""
        at = f", read at {r['mpp']:g} um/px" if r.get("mpp") else ""
        lines.append(f"slide:        {r.get('slide', '?')} ({model}{at})")
    if r.get("cell_px0"):
        lines.append(f"cell:         {r.get('token_px')} px at that resolution, {r['cell_px0']:.6g} level-0 px")
    elif r.get("coords"):
        lines.append(f"coords:       {', '.join(f'{k} {v}' for k, v in r['coords'].items()) or 'no attributes'}")
    if r["kind"] == "pt":
        lines.append("note:         a pt file holds no coordinates or provenance; its h5 or zarr twin has them")
    lines += [f"warning:      {n}" for n in r["notes"]]
    return "\n".join(lines)
