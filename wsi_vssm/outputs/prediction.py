"""`prediction.json`, one slide's record: schema `wsi-vssm-prediction/2` (docs/outputs.md documents every key).

v2 keeps every v1 key where it was (`probability`, `label`, `threshold`, `reason`, `model.token_px`,
`mpp.analysis`, ...) and adds `schema`, `slide_threshold`, `cell_threshold`, `lesion_extent_threshold`,
`lesion_merge_distance_cells`, `device`, `summary`, `lesions`,
`model.weights_hash`, `model.sha256`, `model.domain`, `in_domain` and `domain_notes` (and, since 2026-12-04,
`domain_distance` and `domain_threshold`, and since 2026-12-06 `slide_logit`: added keys, so v1 and earlier v2
readers still work). The writer checks that a record has exactly these keys, so what is documented is what is
written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from wsi_vssm.atomic import atomic_write_json
from wsi_vssm.errors import UsageError

SCHEMA = "wsi-vssm-prediction/2"
KEYS = (
    "schema", "slide", "probability", "slide_logit", "label", "threshold", "slide_threshold", "cell_threshold",
    "lesion_extent_threshold", "lesion_merge_distance_cells", "reason", "in_domain", "domain_notes",
    "domain_distance", "domain_threshold", "device",
    "model", "mpp", "summary", "lesions", "parameters", "timings", "version",
)  # fmt: skip
MODEL_KEYS = ("name", "mpp", "token_px", "hash", "weights_hash", "sha256", "domain")
SUMMARY_KEYS = ("n_cells", "cells_at_cell_threshold", "tissue_area_mm2", "largest_lesion_mm", "warnings")


def write_prediction_json(path: str | os.PathLike, record: Mapping) -> None:
    """Write one slide's record atomically, keys in `KEYS` order; UsageError when it breaks the schema.

    Every key must be present (None where unknown) and no other. `reason` must say why when `probability` is
    None, and be None otherwise.
    """
    _check_keys("prediction record", record, KEYS)
    _check_keys("prediction record `model`", record["model"], MODEL_KEYS)
    _check_keys("prediction record `summary`", record["summary"], SUMMARY_KEYS)
    if (record["probability"] is None) != (record["reason"] is not None):
        raise UsageError("prediction record: `reason` is required exactly when `probability` is null")
    atomic_write_json(path, {**{k: record[k] for k in KEYS}, "schema": SCHEMA})


def read_prediction_json(path: str | os.PathLike) -> dict:
    """A prediction.json as a dict (v1 or v2); UsageError (one line, naming the file and why) when it is not one.
    Every reader of the file (`info`, napari, pN staging) goes through here, so they refuse alike."""
    try:
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # a torn or hand-edited file; UnicodeDecodeError is one too
        raise UsageError(f"{path}: cannot be read (not JSON: {e})") from None
    if not isinstance(rec, dict) or "probability" not in rec:
        raise UsageError(f"{path}: not a wsi-vssm prediction.json (no `probability` key)")
    return rec


def _check_keys(what: str, record: Mapping, keys: tuple[str, ...]) -> None:
    if not isinstance(record, Mapping):
        raise UsageError(f"{what} must be a mapping, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    extra = sorted(set(record) - set(keys))
    if missing or extra:
        raise UsageError(f"{what}: missing keys {missing}, unknown keys {extra}")
