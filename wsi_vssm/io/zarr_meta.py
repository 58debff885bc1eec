"""Zarr metadata read straight from its JSON files (standard library only): a group's attributes, and whether a
folder is one series of a bioformats2raw store. For slide names and hints, where opening the store through zarr
would be slow or would fail on the very mistake being named."""

from __future__ import annotations

import json
import os
from pathlib import Path


def zarr_attrs_on_disk(path: Path) -> dict:
    """A zarr group's attributes from its metadata file (v2 .zattrs, v3 zarr.json; an `ome` block's keys lifted),
    {} where there are none."""
    try:
        if (path / ".zattrs").is_file():
            found = json.loads((path / ".zattrs").read_text(encoding="utf-8"))
        else:
            found = json.loads((path / "zarr.json").read_text(encoding="utf-8")).get("attributes")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(found, dict):
        return {}
    return {**found, **found.get("ome", {})} if isinstance(found.get("ome"), dict) else found


def bioformats2raw_series(path: str | os.PathLike) -> tuple[Path, int] | None:
    """(the store, how many series it holds) when `path` is one series folder (`0`, `1`, ...) of a bioformats2raw
    store; None otherwise."""
    path = Path(os.path.abspath(path))
    if not (path.name.isdigit() and path.is_dir()):
        return None
    if zarr_attrs_on_disk(path.parent).get("bioformats2raw.layout") is None:
        return None
    try:
        n = sum(1 for e in os.scandir(path.parent) if e.name.isdigit() and e.is_dir())
    except OSError:
        n = 2  # unknown: named with its series, which is never wrong
    return path.parent, n
