"""Training recipes (pipelines/*.toml): load one, apply `--set section.key=value` overrides, run its stages.

Values come from the recipe, overridden by `section.key=value` assignments (the value is parsed as TOML, else
taken as a string). The resolved recipe is written to OUT/recipe.resolved.json before any stage runs.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from wsi_vssm.errors import UsageError

STAGES = ("cells", "context", "dense", "mosaic_mil", "attach_mil")


def load_recipe(path: str | os.PathLike) -> dict:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise UsageError(f"cannot read recipe {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not a TOML recipe: not UTF-8 text (byte {e.start})") from e


def apply_overrides(recipe: dict, sets: list[str]) -> dict:
    """`section.key=value` assignments (nested keys with dots); values parsed as TOML when they parse."""
    import tomllib

    out = copy.deepcopy(recipe)
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set needs KEY=VALUE, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare path or word
        *parents, leaf = key.strip().split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {key}: {p!r} is not a table")
        node[leaf] = value
    return out


def run_recipe(recipe: dict, out: Path, progress: bool = True, resume: bool = False) -> Path:
    """Run the stages in order; returns the model file (OUT/model.pt). `resume`: stages that checkpoint every
    epoch (dense) continue from their last checkpoint."""
    from wsi_vssm.atomic import atomic_write_json

    table = recipe.get("recipe", {})
    if not isinstance(table, dict):
        raise UsageError(f"recipe: [recipe] must be a table, got {table!r}")
    stages = table.get("stages", ["cells"])
    stages = [stages] if isinstance(stages, str) else list(stages) if isinstance(stages, list) else None
    if stages is None:
        raise UsageError(f"recipe.stages must be a list of stage names, got {table.get('stages')!r}")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UsageError(f"unknown recipe stage(s) {unknown}; valid: {', '.join(STAGES)}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "recipe.resolved.json", recipe)
    model_path = out / "model.pt"
    for stage in stages:
        if stage == "cells":
            _stage_cells(recipe, model_path, progress)
        elif stage == "context":
            _stage_context(recipe, model_path, out, progress)
        elif stage == "dense":
            _stage_dense(recipe, model_path, out, progress, resume)
        elif stage == "mosaic_mil":
            _stage_mosaic_mil(recipe, model_path, out, progress)
        elif stage == "attach_mil":
            _stage_attach(recipe, model_path)
    return model_path


def _patch_data(recipe: dict) -> dict:
    """The recipe's [data] table, with its two patch sources present."""
    data = recipe.get("data", {})
    for key in ("train", "valid"):
        if not data.get(key):
            raise UsageError(f"recipe needs data.{key}: give it with --set data.{key}=PATH")
    return data


def _stage_cells(recipe: dict, model_path: Path, progress: bool) -> None:
    from wsi_vssm.training.cells import TrainCellsConfig, train_cells

    data = _patch_data(recipe)
    try:
        cfg = TrainCellsConfig(**recipe.get("cells", {}))
    except (TypeError, ValueError) as e:  # unknown keys, or values of the wrong kind
        raise UsageError(f"recipe [cells]: {e}") from e
    r = train_cells(data["train"], data["valid"], model_path, cfg, slides=data.get("slides") or None,
                    progress=progress)
    print(f"cells: best epoch {r.best_epoch} of {len(r.log)}, valid(select) AUC {r.select['auc']:.4f}"
               + (f", held-back valid AUC {r.holdout['auc']:.4f}" if r.holdout else "") + f" ({r.seconds:.0f} s)")


def _stage_context(recipe: dict, model_path: Path, out: Path, progress: bool) -> None:
    """Continue the cell stage's model on patches plus mosaics of them ([context] overrides [cells]); the cell
    stage's file is kept as OUT/cells.pt and its record goes into the new model's metadata."""
    import shutil

    from wsi_vssm.models.slide_model import load_model, save_model
    from wsi_vssm.training.cells import TrainCellsConfig, train_cells

    if not model_path.is_file():
        raise UsageError(f"stage context needs the cell stage's model {model_path}: run stage cells first")
    data = _patch_data(recipe)
    cells_path = out / "cells.pt"
    if not cells_path.exists():
        shutil.copyfile(model_path, cells_path)
    try:
        cfg = TrainCellsConfig(**{**recipe.get("cells", {}), **recipe.get("context", {}), "init": str(cells_path)})
    except (TypeError, ValueError) as e:  # unknown keys, or values of the wrong kind
        raise UsageError(f"recipe [context]: {e}") from e
    r = train_cells(data["train"], data["valid"], model_path, cfg, progress=progress,
                    log_path=out / "context.log.csv")
    before = load_model(cells_path).metadata
    model = load_model(model_path)
    keep = ("metrics", "log", "best_epoch", "epochs_run", "config", "train_seconds")
    save_model(model, model_path, {**model.metadata, "cells_stage": {k: before.get(k) for k in keep}})
    hold = r.holdout or {}
    print(f"context: best epoch {r.best_epoch} of {len(r.log)}, valid(select) AUC {r.select['auc']:.4f} "
               f"in-mosaic {r.select.get('mosaic_auc', float('nan')):.4f}"
               + (f", held-back AUC {hold['auc']:.4f} in-mosaic {hold['mosaic_auc']:.4f}" if hold else "")
               + f" ({r.seconds:.0f} s)")


def _stage_dense(recipe: dict, model_path: Path, out: Path, progress: bool, resume: bool) -> None:
    """Continue the context stage's model with dense token labels and mined hard negatives; that model is kept
    as OUT/context.pt (the stage starts from it, also when resumed)."""
    import shutil

    from wsi_vssm.training.dense import DenseConfig, train_dense

    data = _patch_data(recipe)
    start = out / "context.pt"
    if not start.exists():
        if not model_path.is_file():
            raise UsageError(f"stage dense needs the context stage's model {model_path}: run stage context first")
        shutil.copyfile(model_path, start)
    try:
        cfg = DenseConfig(**{"valid_select": recipe.get("cells", {}).get("valid_select", 1000),
                             **recipe.get("dense", {}), **({"resume": True} if resume else {})})
    except (TypeError, ValueError) as e:  # unknown keys, or values of the wrong kind
        raise UsageError(f"recipe [dense]: {e}") from e
    r = train_dense(start, data["train"], data["valid"], model_path, cfg, progress=progress)
    hold = r.get("holdout") or {}
    print(f"dense: best epoch {r['best_epoch']} of {r['epochs_run']}, cell threshold {r['cell_threshold']:.4f}"
          + (f", held-back patch AUC {hold['iso_auc']:.4f}, dense token AUC {hold['dense_auc']:.4f}" if hold else "")
          + f" ({r['seconds']:.0f} s)")


def _stage_mosaic_mil(recipe: dict, model_path: Path, out: Path, progress: bool) -> None:
    from wsi_vssm.training.mosaic import MosaicMILConfig, train_mil_on_mosaics

    if not model_path.is_file():
        raise UsageError(f"stage mosaic_mil needs the cell stage's model {model_path}: run stage cells first")
    data, cells = _patch_data(recipe), recipe.get("cells", {})
    try:
        cfg = MosaicMILConfig(**recipe.get("mosaic_mil", {}))
        split_seed = int(cells.get("seed", 0))
    except (TypeError, ValueError) as e:  # unknown keys, or values of the wrong kind
        raise UsageError(f"recipe [mosaic_mil]: {e}") from e
    r = train_mil_on_mosaics(model_path, data["train"], data["valid"], out / "mosaic_mil", cfg,
                             valid_select=cells.get("valid_select"), split_seed=split_seed,
                             progress=progress)
    print(f"mosaic_mil: valid slide AUC {r['valid_slide_auc']:.4f}"
               + (f", held-out test slide AUC {r['test']['auc']:.4f}" if "test" in r else "")
               + f" ({r['seconds']:.0f} s)")


def _stage_attach(recipe: dict, model_path: Path) -> None:
    from wsi_vssm.models.slide_model import attach_mil, load_model, save_model

    ckpt = recipe.get("attach_mil", {}).get("checkpoint")
    if not ckpt:
        raise UsageError("stage attach_mil needs attach_mil.checkpoint (--set attach_mil.checkpoint=PATH)")
    model = attach_mil(load_model(model_path), ckpt)
    meta = dict(model.metadata)
    meta["mil_stage"] = {"method": "attached MIL checkpoint", "checkpoint": str(ckpt)}
    save_model(model, model_path, meta)
    print(f"attach_mil: MIL head from {ckpt}")
