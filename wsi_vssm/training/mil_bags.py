"""The bags `train mil` learns from: feature stores with their slide labels, read once and cached, and the
check that they were made alike (the same backbone and resolution; like extract settings, or a warning)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np

from wsi_vssm.errors import UsageError
from wsi_vssm.pipeline.store import FeatureStore

FEATURE_KEYS = ("model_id", "model_hash", "mpp", "token_px", "n_features")  # must agree across stores
# extract settings that change the features without changing their meaning: mixing them is warned about (CPU
# and GPU default regions differ), and the checkpoint records what it was trained on
EXTRACT_KEYS = ("region_px", "overlap_px", "min_tissue")
_WHY_ALIKE = {"region_px": "a cell's features depend on how near it lay to a region edge",
              "overlap_px": "a cell's features depend on how near it lay to a region edge",
              "min_tissue": "the bags keep cells by different tissue thresholds"}

Bag = tuple[str | os.PathLike | FeatureStore, int]


class Bags:
    """Feature stores with their labels; each bag's features read once and kept while the cache budget lasts
    (past it, the bags first read stay and the others are read each time)."""

    def __init__(self, bags: Sequence[Bag], cache_mb: float):
        self.stores = [b if isinstance(b, FeatureStore) else FeatureStore.open(b) for b, _ in bags]
        self.labels = [_label(y, s) for (_, y), s in zip(bags, self.stores, strict=True)]
        self._budget = cache_mb * 2**20
        self._cache: dict[int, np.ndarray] = {}
        self._cached = 0  # bytes held
        self._with_cells: Bags | None = None

    def __len__(self) -> int:
        return len(self.stores)

    def names(self) -> list[str]:
        return [s.name for s in self.stores]

    def features(self, i: int) -> np.ndarray:
        if i in self._cache:
            return self._cache[i]
        f = self.stores[i].read_features()
        if self._cached + f.nbytes <= self._budget:
            self._cache[i] = f
            self._cached += f.nbytes
        return f

    def with_cells(self) -> Bags:
        """These bags less those without cells: the same object each time it is asked (an ensemble's members
        train on it in turn), so that what it has read is kept."""
        if self._with_cells is None:
            keep = [i for i, s in enumerate(self.stores) if len(s)]
            self._with_cells = self if len(keep) == len(self) else self.subset(keep)
        return self._with_cells

    def subset(self, keep: Sequence[int]) -> Bags:
        """The bags at `keep`, sharing their stores and what this one has read."""
        part = Bags([], self._budget / 2**20)
        part.stores = [self.stores[i] for i in keep]
        part.labels = [self.labels[i] for i in keep]
        for j, i in enumerate(keep):
            if i in self._cache:
                part._cache[j] = self._cache[i]
                part._cached += self._cache[i].nbytes
        return part


def _label(y, store: FeatureStore) -> int:
    if isinstance(y, (bool, np.bool_)) or y not in (0, 1):
        raise UsageError(f"{store.path}: slide label must be 0 or 1, got {y!r}")
    return int(y)


def check_compatible(stores: Sequence[FeatureStore]) -> dict:
    """The feature attrs all stores share (FEATURE_KEYS); a store from another backbone is a clear error."""
    if not stores:
        raise UsageError("no feature stores given")
    ref = stores[0]
    for s in stores[1:]:
        for key in FEATURE_KEYS:
            if s.attrs.get(key) != ref.attrs.get(key):
                raise UsageError(
                    f"{s.path}: made with {key}={s.attrs.get(key)!r}, but {ref.path} with {ref.attrs.get(key)!r}; "
                    "features from different backbones or settings cannot be mixed (re-extract them)"
                )
    return {**{k: ref.attrs.get(k) for k in FEATURE_KEYS}, **_extract_settings(stores)}


def settings_of(paths) -> dict:
    """`check_compatible` over the stores at `paths`, for a record: without the mixed-settings warnings, which
    training on them gave already."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return check_compatible([FeatureStore.open(p) for p in paths])


def _extract_settings(stores: Sequence[FeatureStore]) -> dict:
    """Each EXTRACT_KEYS setting the stores were made with: its value, or the sorted list of the values found
    (None last: a store that does not record it), with one warning per setting that differs."""
    settings = {}
    for key in EXTRACT_KEYS:
        by_value: dict = {}
        for s in stores:
            by_value.setdefault(s.attrs.get(key), []).append(s)
        if len(by_value) == 1:
            settings[key] = next(iter(by_value))
            continue
        known = sorted(v for v in by_value if v is not None)
        settings[key] = known + ([None] if None in by_value else [])
        parts = [f"{v} ({len(by_value[v])}, e.g. {by_value[v][0].path.name})" for v in settings[key]]
        warnings.warn(f"the feature stores were made with different {key}: {', '.join(parts)}; "
                      f"{_WHY_ALIKE[key]}: extract them again with one --{key.replace('_', '-')} to train on like "
                      "bags", stacklevel=3)
    return settings
