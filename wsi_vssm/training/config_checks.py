"""Value ranges of the training configs, checked when a config is built: a recipe (`wsi-vssm run`, whose
`check_values` builds every stage's config before any trains) or a command then stops at once with the key
named, instead of training for hours on `mpp = 0` and failing at the save, or running silently with
`epoch_size = -3` read as "all but 3".

A rule is a short string: `>0`, `>=0`, `>=1`, `>=2`, `[0,1)`, `[0,1]`, `(0,1]`; a trailing `?` lets the value
be None (the field's "off" or "default"). Numbers must be finite and not booleans.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from wsi_vssm.errors import UsageError, is_real_number

_BOUND = re.compile(r"^(>=|>)(-?[\d.]+)$")
_RANGE = re.compile(r"^([\[(])(-?[\d.]+),(-?[\d.]+)([\])])$")


def _fits(value, rule: str) -> bool:
    if not is_real_number(value) or not math.isfinite(value):
        return False
    if m := _BOUND.match(rule):
        low = float(m.group(2))
        return value >= low if m.group(1) == ">=" else value > low
    m = _RANGE.match(rule)
    if m is None:
        raise ValueError(f"bad rule {rule!r}")
    low, high = float(m.group(2)), float(m.group(3))
    above = value >= low if m.group(1) == "[" else value > low
    below = value <= high if m.group(4) == "]" else value < high
    return above and below


def check_ranges(cfg, rules: Mapping[str, str], prefix: str = "") -> None:
    """UsageError `PREFIXname must be RULE, got VALUE` for the first field of `cfg` outside its rule."""
    for name, rule in rules.items():
        value = getattr(cfg, name)
        optional = rule.endswith("?")
        if optional and value is None:
            continue
        rule = rule.rstrip("?")
        if not _fits(value, rule):
            none = " (or null)" if optional else ""
            raise UsageError(f"{prefix}{name} must be {_spelt(rule)}{none}, got {value!r}")


def _spelt(rule: str) -> str:
    """`>=1` -> `>= 1`, `[0,1)` -> `in [0, 1)`."""
    if rule[0] in "[(":
        return f"in {rule.replace(',', ', ')}"
    bound = _BOUND.match(rule)
    return f"{bound.group(1)} {bound.group(2)}"


def check_choice(value, choices, name: str) -> None:
    """UsageError naming `name` and the valid values when `value` is not one of `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_common(cfg, prefix: str = "") -> None:
    """The fields the cell and dense configs share: the scan implementation, the augmentation's amounts."""
    from wsi_vssm.models.ss2d import IMPLS

    check_choice(cfg.scan, IMPLS, f"{prefix}scan")
    check_ranges(cfg.augment, AUGMENT_RULES, f"{prefix}augment.")


def check_cells_config(cfg) -> None:
    """`training.cells.TrainCellsConfig`: every range, the architecture, scan and device names, the cell size."""
    from wsi_vssm.models.device import Device
    from wsi_vssm.models.model_file import check_token_px
    from wsi_vssm.models.registry import list_models

    check_ranges(cfg, CELLS_RULES)
    check_choice(cfg.arch, list_models(), "arch")
    check_choice(str(cfg.device).lower(), [d.value for d in Device], "device")
    check_token_px(cfg.token_px)
    check_common(cfg)


def check_mosaic_config(cfg) -> None:
    """`training.mosaic.MosaicMILConfig`: ranges, the mosaic grid, the pooling candidates and their top-k."""
    from wsi_vssm.models.mil import POOLS
    from wsi_vssm.synth.mosaic import MAX_GRID, MIN_GRID

    check_ranges(cfg, MOSAIC_RULES, "mosaic_mil.")
    grid = list(cfg.grid) if isinstance(cfg.grid, (list, tuple)) else [cfg.grid, cfg.grid]
    if len(grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) and MIN_GRID <= g <= MAX_GRID
                                 for g in grid) or grid[0] > grid[1]:
        raise UsageError(f"mosaic_mil.grid must be {MIN_GRID} to {MAX_GRID} patches a side, or [low, high] with "
                         f"low <= high, got {cfg.grid!r}")
    from wsi_vssm.models.mil import MAX_MEMBERS

    if isinstance(cfg.ensemble, bool) or not isinstance(cfg.ensemble, int) or not 1 <= cfg.ensemble <= MAX_MEMBERS:
        raise UsageError(f"mosaic_mil.ensemble must be an integer from 1 to {MAX_MEMBERS}, got {cfg.ensemble!r}")
    pools = [cfg.pool] if isinstance(cfg.pool, str) else list(cfg.pool)
    ks = [cfg.topk] if isinstance(cfg.topk, int) else list(cfg.topk)
    if not pools or not ks:
        raise UsageError(f"mosaic_mil.{'pool' if not pools else 'topk'} is empty: give at least one")
    for pool in pools:
        check_choice(pool, POOLS, "mosaic_mil.pool")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UsageError(f"mosaic_mil.topk must be integers >= 1, got {cfg.topk!r}")


CELLS_RULES = {  # TrainCellsConfig (and [context], which overrides it)
    "epochs": ">=1", "batch_size": ">=1", "patience": ">=1", "min_epochs": ">=0", "lr": ">0",
    "weight_decay": ">=0", "warmup_frac": "[0,1)", "seed": ">=0", "max_train": ">=1?", "epoch_size": ">=1?",
    "valid_select": ">=2?",
    "mpp": ">0", "mil_bags": ">=0", "mil_bag_size": ">=1", "mil_patches": ">=1", "mil_steps": ">=1",
    "region_batch": ">=1", "region_crop_px": ">=32", "ema": "[0,1)", "drop_path": "[0,1)?",
}
DENSE_RULES = {
    "epochs": ">=1", "rounds": ">=0", "round_epochs": ">=1", "plateau": ">=1", "min_gain": ">=0",
    "epoch_patches": ">=1", "batch_size": ">=1", "mosaic_cells": ">=1", "max_lesion_frac": "(0,1]",
    "rim_weight": ">=0", "background_weight": ">=0", "hard_share": "[0,1]", "hard_top": "(0,1]", "lr": ">0",
    "weight_decay": ">=0", "warmup_steps": ">=0", "ema": "[0,1)", "drop_path": "[0,1)", "seed": ">=0",
    "valid_select": ">=2?", "eval_grid": ">=1", "token_specificity": "[0.5,1)", "consistency": ">=0", "distill": ">=0",
}
MOSAIC_RULES = {
    "train_slides": ">=1", "valid_slides": ">=1", "epochs": ">=1", "patience": ">=1", "test_slides": ">=0",
    "synth_train_slides": ">=0", "synth_valid_slides": ">=0", "max_lesion_frac": "(0,1]", "seed": ">=0",
    "lr": ">0", "max_cells": ">=1?", "synth_size": "[1024,400000]",
    "synth_mpp": ">0",
}
AUGMENT_RULES = {"hed_scale": "[0,1]", "hed_shift": "[0,1]", "brightness": "[0,1]", "contrast": "[0,1]",
                 "saturation": "[0,1]", "blur_p": "[0,1]"}
