"""Training recipes (pipelines/*.toml): run a recipe's stages in order, resumably.

What a recipe may hold, loading it, `--set section.key=value` overrides and the checks made before anything runs
are `training.recipe_config`'s (its public names are importable from here too). The resolved recipe is written
to OUT/recipe.resolved.json before any stage runs.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from wsi_vssm.errors import UsageError
from wsi_vssm.training.recipe_config import (  # noqa: F401  (re-exported: callers import them from here)
    _CONFIGS,
    STAGES,
    _cells_config,
    _context_config,
    _dense_config,
    _mosaic_config,
    apply_overrides,
    check_files,
    check_recipe,
    check_values,
    load_recipe,
    precision_overrides,
    recipe_schema,
    recipe_stages,
)

RESOLVED_JSON = "recipe.resolved.json"  # the recipe as run, written before any stage runs (`info RUN` looks for it)
PROGRESS_JSON = "recipe.progress.json"  # the stages finished in OUT, each with the settings it ran with
CHECKPOINTS = {"cells": "cells.checkpoint.pt", "context": "context.checkpoint.pt", "dense": "dense/checkpoint.pt"}
WORK_MODEL = "model.work.pt"  # the model the stages pass along; OUT/model.pt is replaced only when all are through
IN_WORK_MODEL = ("cells", "context")  # stages that keep their best epoch so far in the work model while they train
SET_ASIDE = ".replaced"  # suffix of a finished dense run's checkpoint while the stage runs again with new settings


def run_recipe(recipe: dict, out: Path, progress: bool = True, resume: bool = False,
               provenance: dict | None = None) -> Path:
    """Run the stages in order; returns the model file (OUT/model.pt). Each finished stage leaves its model as
    OUT/<stage>.pt and is recorded in OUT/recipe.progress.json with its settings. `resume`: a stage finished
    before with the same settings (and the same stages before it) is skipped; the cells, context and dense
    stages continue from their per-epoch checkpoints. A stage that runs makes the records and checkpoints of
    every later stage (in STAGES order) stale, so they are dropped. Without `resume`, an interrupted stage's
    checkpoint stops the run before any stage trains (it is never thrown away silently). A stage's settings
    include its data's contents (file count and bytes), so a folder that changed retrains. The model file
    records the recipe it was made by (`metadata["recipe"]`: `provenance`, e.g. the command, and the resolved
    recipe). The stages pass their model along in OUT/model.work.pt: OUT/model.pt stays the last finished run's
    until every stage of this one is through (a rerun that stops or fails leaves it as it was)."""
    import shutil

    from wsi_vssm.atomic import atomic_write_json
    from wsi_vssm.training.checkpoint import refuse_unless_resuming

    check_recipe(recipe)  # its tables, value types and every stage's values, so the lines below need not
    check_files(recipe)
    stages = recipe_stages(recipe)
    resuming = set()  # stages that go on from their own checkpoint
    for stage in stages:
        if stage in CHECKPOINTS:
            own = bool(recipe.get(stage, {}).get("resume"))  # dense.resume / cells.resume in the recipe
            refuse_unless_resuming(out / CHECKPOINTS[stage], resume or own, "run --resume")
            if (resume or own) and (out / CHECKPOINTS[stage]).is_file():
                resuming.add(stage)
    for stage in stages:
        if _CONFIGS.get(stage) and not ({stage, "cells"} if stage == "context" else {stage}) & set(recipe):
            print(f"{stage}: the recipe has no [{stage}] section: it trains with the built-in defaults "
                  "(docs/training.md)")
    out.mkdir(parents=True, exist_ok=True)
    resolved = {**recipe, "recipe": {**recipe.get("recipe", {}), "out": str(out)}}  # where it did run
    atomic_write_json(out / RESOLVED_JSON, resolved)
    final_path, model_path = out / "model.pt", out / WORK_MODEL
    # cells and context keep their best epoch so far in the work model: a stage that goes on needs it as it is
    goes_on = resuming & set(IN_WORK_MODEL)
    keep_work = model_path.is_file() and bool(goes_on)
    if not keep_work:
        model_path.unlink(missing_ok=True)  # a stopped run's
    done = read_progress(out) if resume else []
    contents = _data_contents(recipe.get("data", {}))
    chain, previous = True, None  # chain: every stage so far was skipped as done before
    for stage in stages:
        settings = {**_stage_settings(recipe, stage), "data_contents": contents}
        if chain and any(d["stage"] == stage and _same(d["settings"], settings) for d in done) \
                and (out / f"{stage}.pt").is_file():
            print(f"{stage}: done before with these settings ({out / f'{stage}.pt'}); skipped (--resume)")
            left = out / CHECKPOINTS.get(stage, "-")
            # cells and context remove their checkpoint when they finish, so one here is a later run's (other
            # settings, failed or stopped) and would block every run; dense keeps its own on purpose (--resume
            # with a larger dense.epochs extends it)
            if stage != "dense" and left.is_file():
                left.unlink()
                print(f"{stage}: removed {left}, left by a later run with other settings")
            previous = stage
            continue
        if keep_work and stage in goes_on and (ckpt := out / CHECKPOINTS[stage]).is_file():
            # its best epoch so far, which it goes on from (it starts from cells.pt or from scratch); each epoch
            # writes that file before its checkpoint, so a later one is another run's (stopped with other settings)
            if model_path.stat().st_mtime_ns > ckpt.stat().st_mtime_ns:
                raise UsageError(f"{model_path} was written after {ckpt}, by a later run: it is not the best epoch "
                                 f"so far of the {stage} stage that checkpoint continues; remove {ckpt} to start "
                                 "the stage over")
        elif chain and previous is not None:  # the skipped stages' last model is where this one starts
            shutil.copyfile(out / f"{previous}.pt", model_path)
        elif chain and final_path.is_file():  # the first stage builds on OUT's model (context alone, say)
            shutil.copyfile(final_path, model_path)
        before = next((d["settings"] for d in done if d["stage"] == stage), None) if chain else None
        if before is not None and not _same(before, settings):  # say why hours of training run again
            _say_rerun(out, stage, before, settings)
        chain = False
        later = STAGES[STAGES.index(stage) + 1:]  # built on this stage's old model: no longer done
        done = [d for d in done if d["stage"] != stage and d["stage"] not in later]
        if stage == "cells":
            _stage_cells(recipe, model_path, out, progress, resume)
        elif stage == "context":
            _stage_context(recipe, model_path, out, progress, resume)
        elif stage == "dense":
            _stage_dense(recipe, model_path, out, progress, resume)
        elif stage == "mosaic_mil":
            _stage_mosaic_mil(recipe, model_path, out, progress)
        elif stage == "attach_mil":
            _stage_attach(recipe, model_path)
        shutil.copyfile(model_path, out / f"{stage}.pt")
        # only now: a run stopped before this stage finished (say, on reading that a default it never set has
        # changed) keeps the later stages' checkpoints, and a finished dense run's set-aside one
        _drop_stale(out, later)
        _set_aside(out, stage).unlink(missing_ok=True)
        done.append({"stage": stage, "settings": settings})  # its old record was dropped above
        atomic_write_json(out / PROGRESS_JSON, {"done": done})
        previous = stage
    if chain and previous is not None:  # every stage done before: the last one's model is the result
        shutil.copyfile(out / f"{previous}.pt", model_path)
    _record_recipe(model_path, {**(provenance or {}), "stages": stages, "resolved": resolved})
    os.replace(model_path, final_path)
    return final_path


def _say_rerun(out: Path, stage: str, before: dict, settings: dict) -> None:
    """The line saying why a finished stage runs again. A finished dense run whose changed settings its
    checkpoint allows (more epochs, another plateau rule) goes on from it; with any other change its
    checkpoint is set aside (removed once the stage finishes), so the stage starts over as the line says
    instead of refusing the checkpoint."""
    from wsi_vssm.training.dense import RESUME_MAY_CHANGE

    changed = _changed(before, settings)
    ckpt = out / CHECKPOINTS.get(stage, "-")
    if stage == "dense" and ckpt.is_file() and all(
            k.startswith("settings.") and k.split(".", 1)[1] in RESUME_MAY_CHANGE for k in changed):
        print(f"{stage}: settings changed since the earlier run ({_said(before, settings)}); goes on from its "
              f"checkpoint {ckpt}, and the stages after it run again")
        return
    print(f"{stage}: settings changed since the earlier run ({_said(before, settings)}); runs again, and the "
          "stages after it")
    aside = _set_aside(out, stage)
    if stage == "dense" and ckpt.is_file() and not aside.exists():  # one there: this checkpoint is the rerun's
        os.replace(ckpt, aside)
        print(f"{stage}: the earlier run's checkpoint set aside as {aside} until the stage has run again")


def _set_aside(out: Path, stage: str) -> Path:
    return out / (CHECKPOINTS.get(stage, "-") + SET_ASIDE)


def _record_recipe(model_path: Path, record: dict) -> None:
    """The recipe that made the model, in its metadata (`recipe`), so that a copied model file still says how it
    was made."""
    from wsi_vssm.models.slide_model import load_model, save_model

    model = load_model(model_path)
    save_model(model, model_path, {**model.metadata, "recipe": record})


def _same(recorded: dict, settings: dict) -> bool:
    """Whether a stage recorded in recipe.progress.json ran with `settings`; a record written before the data's
    contents were recorded compares without them."""
    if "data_contents" not in recorded:
        settings = {k: v for k, v in settings.items() if k != "data_contents"}
    return recorded == settings


def _data_contents(data: dict) -> dict:
    """[file count, bytes] of each data source (a tar: [1, its size]), so that a folder whose patches changed is
    not taken for the one a finished stage trained on; None for a path that is not there (its stage says so)."""
    out = {}
    for key in ("train", "valid", "slides"):
        value = data.get(key)
        if not value:
            continue
        path = Path(os.path.expanduser(value))
        if path.is_file():
            out[key] = [1, path.stat().st_size]
        elif path.is_dir():
            sizes = [os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files]
            out[key] = [len(sizes), sum(sizes)]
        else:
            out[key] = None
    return out


def _stage_settings(recipe: dict, stage: str) -> dict:
    """What a stage's result depends on: its section (and [cells] for the later stages), [data]; not `resume`."""
    import json

    sections = {"context": ("cells", "context"), "dense": ("cells", "dense"),  # [cells]: their split and seed
                "mosaic_mil": ("cells", "mosaic_mil")}.get(stage, (stage,))
    merged = {k: v for s in sections for k, v in recipe.get(s, {}).items() if k != "resume"}
    settings = {"data": recipe.get("data", {}), **({"settings": merged} if merged else {})}
    return _same_paths(json.loads(json.dumps(settings, default=str)))  # as recipe.progress.json holds it


_PATH_KEYS = {"data": ("train", "valid", "slides"), "settings": ("init", "checkpoint", "model")}


def _same_paths(settings: dict) -> dict:
    """`settings` with its file paths absolute and normalised, so that `./pcam` and `pcam` (or a recipe run from
    elsewhere naming the same folder) are the same setting and do not retrain a finished stage."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in settings.items()}
    for table, keys in _PATH_KEYS.items():
        for key in keys:
            value = out.get(table, {}).get(key) if isinstance(out.get(table), dict) else None
            if isinstance(value, str) and value:
                out[table][key] = os.path.abspath(os.path.expanduser(value))
    return out


def _said(before: dict, now: dict, most: int = 6) -> str:
    """The changed settings with their old and new values (`settings.seed 0 -> 1`): a default that moved between
    versions is recognised by its values."""
    def value(d: dict, key: str):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        text = repr(d)
        return text if len(text) <= 40 else text[:37] + "..."

    keys = _changed(before, now)
    shown = [f"{k} {value(before, k)} -> {value(now, k)}" for k in keys[:most]]
    return ", ".join(shown + ([f"and {len(keys) - most} more"] if len(keys) > most else []))


def _changed(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two settings dicts (`data.train`, `settings.lr`)."""
    keys = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _changed(x, y, f"{prefix}{k}.")
        elif x != y:
            keys.append(f"{prefix}{k}")
    return keys


def read_progress(out: Path) -> list[dict]:
    """The finished stages recorded in OUT/recipe.progress.json ({stage, settings}), [] when none can be read."""
    import json

    try:
        doc = json.loads((out / PROGRESS_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    done = list(doc.get("done") or []) if isinstance(doc, dict) else []
    return [{**d, "settings": _same_paths(d["settings"])} if isinstance(d.get("settings"), dict) else d
            for d in done if isinstance(d, dict)]  # records written before paths were normalised compare too


def _drop_stale(out: Path, later: list[str]) -> None:
    """Checkpoints of stages after one that ran again were built on its old model: removed, with a line."""
    for stage in later:
        path = out / CHECKPOINTS.get(stage, "-")
        if path.is_file():
            path.unlink()
            print(f"{stage}: its checkpoint {path} was built on an earlier stage that ran again: removed")


def _patch_data(recipe: dict) -> dict:
    """The recipe's [data] table, with its two patch sources present."""
    data = {k: os.path.expanduser(v) if isinstance(v, str) and v else v for k, v in recipe.get("data", {}).items()}
    for key in ("train", "valid"):
        if not data.get(key):
            raise UsageError(f"recipe needs data.{key}: give it with --set data.{key}=PATH")
        if not Path(data[key]).exists():
            raise UsageError(f"data.{key} = {data[key]}: no such patch folder or tar (give it with --set "
                             f"data.{key}=PATH)")
    return data


def _stage_cells(recipe: dict, model_path: Path, out: Path, progress: bool, resume: bool = False) -> None:
    from wsi_vssm.training.cells import train_cells

    data = _patch_data(recipe)
    cfg = _cells_config(recipe)  # its values were checked with the recipe's (check_values)
    cfg = dataclasses.replace(cfg, resume=resume or cfg.resume, domain=_domain(cfg, data))
    r = train_cells(data["train"], data["valid"], model_path, cfg, slides=data.get("slides") or None,
                    progress=progress, checkpoint_path=out / CHECKPOINTS["cells"])
    print(f"cells: best epoch {r.best_epoch} of {len(r.log)}, valid(select) AUC {r.select['auc']:.4f}"
               + (f", held-back valid AUC {r.holdout['auc']:.4f}" if r.holdout else "") + f" ({r.seconds:.0f} s)")


def _domain(cfg, data: dict) -> str:
    """The recipe's `domain`, else what `train cells` says of its patches: the model file states it, and every
    prediction repeats it (unset, the default model's PCam lymph-node line was claimed for anyone's patches)."""
    return cfg.domain or f"patches of {Path(data['train']).name} at about {cfg.mpp:g} um/px"


def _stage_context(recipe: dict, model_path: Path, out: Path, progress: bool, resume: bool = False) -> None:
    """Continue the cell stage's model (OUT/cells.pt, else OUT/model.pt) on patches plus mosaics of them
    ([context] overrides [cells]); the cell stage's record goes into the new model's metadata."""
    import shutil

    from wsi_vssm.models.slide_model import load_model, save_model
    from wsi_vssm.training.cells import train_cells

    if not model_path.is_file():
        raise UsageError(f"stage context needs the cell stage's model {model_path}: run stage cells first")
    data = _patch_data(recipe)
    cells_path = out / "cells.pt"
    if not cells_path.exists():
        shutil.copyfile(model_path, cells_path)
    cfg = _context_config(recipe, init=str(cells_path))
    cfg = dataclasses.replace(cfg, resume=resume or cfg.resume, domain=_domain(cfg, data))
    r = train_cells(data["train"], data["valid"], model_path, cfg, progress=progress,
                    log_path=out / "context.log.csv", checkpoint_path=out / CHECKPOINTS["context"])
    before = load_model(cells_path).metadata
    model = load_model(model_path)
    keep = ("metrics", "log", "best_epoch", "epochs_run", "config", "train_seconds")
    save_model(model, model_path, {**model.metadata, "stage": "context",
                                   "cells_stage": {k: before.get(k) for k in keep}})
    hold = r.holdout or {}
    print(f"context: best epoch {r.best_epoch} of {len(r.log)}, valid(select) AUC {r.select['auc']:.4f} "
               f"in-mosaic {r.select.get('mosaic_auc', float('nan')):.4f}"
               + (f", held-back AUC {hold['auc']:.4f} in-mosaic {hold['mosaic_auc']:.4f}" if hold else "")
               + f" ({r.seconds:.0f} s)")


def _stage_dense(recipe: dict, model_path: Path, out: Path, progress: bool, resume: bool) -> None:
    """Continue the context stage's model (OUT/context.pt, else OUT/model.pt) with dense token labels and mined
    hard negatives (the stage starts from it, also when resumed)."""
    import shutil

    from wsi_vssm.training.dense import train_dense

    data = _patch_data(recipe)
    start = out / "context.pt"
    if not start.exists():
        if not model_path.is_file():
            raise UsageError(f"stage dense needs the context stage's model {model_path}: run stage context first")
        shutil.copyfile(model_path, start)
    cfg = _dense_config(recipe, resume)
    r = train_dense(start, data["train"], data["valid"], model_path, cfg, progress=progress)
    hold = r.get("holdout") or {}
    print(f"dense: best epoch {r['best_epoch']} of {r['epochs_run']}, cell threshold {r['cell_threshold']:.4f}"
          + (f", held-back patch AUC {hold['iso_auc']:.4f}, dense token AUC {hold['dense_auc']:.4f}" if hold else "")
          + f" ({r['seconds']:.0f} s)")


def _stage_mosaic_mil(recipe: dict, model_path: Path, out: Path, progress: bool) -> None:
    from wsi_vssm.training.mosaic import train_mil_on_mosaics

    if not model_path.is_file():
        raise UsageError(f"stage mosaic_mil needs the cell stage's model {model_path}: run stage cells first")
    data, cells = _patch_data(recipe), recipe.get("cells", {})
    cfg = _mosaic_config(recipe)
    split_seed = int(cells.get("seed", 0))  # an integer: checked with the recipe's types
    r = train_mil_on_mosaics(model_path, data["train"], data["valid"], out / "mosaic_mil", cfg,
                             valid_select=cells.get("valid_select"), split_seed=split_seed,
                             progress=progress)
    print(f"mosaic_mil: valid slide AUC {r['valid_slide_auc']:.4f}"
               + (f", held-out test slide AUC {r['test']['auc']:.4f}" if "test" in r else "")
               + f" ({r['seconds']:.0f} s)")


def _stage_attach(recipe: dict, model_path: Path) -> None:
    from wsi_vssm.models.slide_model import attach_mil, load_model, save_model
    from wsi_vssm.training.checkpoint import stamped
    from wsi_vssm.training.mil import mil_provenance

    ckpt = recipe.get("attach_mil", {}).get("checkpoint")
    if not ckpt:  # check_files says so before any stage trains; kept for callers of the stage alone
        raise UsageError("stage attach_mil needs attach_mil.checkpoint (--set attach_mil.checkpoint=PATH)")
    ckpt = os.path.expanduser(ckpt)
    # attach_mil.model: the slide model to attach to (a file or 'default'), else the earlier stages' OUT/model.pt
    base = recipe.get("attach_mil", {}).get("model") or model_path
    base = base if base == "default" else os.path.expanduser(base)
    model = attach_mil(load_model(base), ckpt)
    meta = dict(model.metadata)
    old = meta.get("slide_threshold", meta.get("threshold"))
    # the old threshold was chosen for the old head; the MIL trainer chooses none, so the neutral one is stated
    meta["slide_threshold"] = meta["threshold"] = 0.5
    meta["mil_stage"] = {"method": "attached MIL checkpoint", "checkpoint": os.path.abspath(ckpt),
                         "slide_threshold": "0.5: not chosen on data (the trainer stores none)",
                         **mil_provenance(ckpt)}
    save_model(model, model_path, stamped(meta))
    was = "the model stored none" if old is None else f"was {old}, chosen for the previous head"
    print(f"attach_mil: MIL head from {ckpt}; slide_threshold 0.5 ({was}): "
          "uncalibrated, choose one on your own selection slides (predict --threshold)")
