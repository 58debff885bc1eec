"""Training recipes (pipelines/*.toml): load one, apply `--set section.key=value` overrides, run its stages.

Values come from the recipe, overridden by `section.key=value` assignments (the value is parsed as TOML, else
taken as a string). Sections, keys and value types are checked against `recipe_schema()` (the stages' config
dataclasses), in the file and in each assignment, and then each stage's config is built from its merged section
(`check_values`: value ranges, a non-empty stage list), all before anything runs. The resolved recipe is written
to OUT/recipe.resolved.json before any stage runs.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path

from wsi_vssm.errors import UsageError

STAGES = ("cells", "context", "dense", "mosaic_mil", "attach_mil")
# The keys the runner reads itself; the stages' sections take their config dataclasses' fields (recipe_schema).
RUNNER_KEYS = {
    "recipe": {"name": str, "description": str, "stages": str | list[str], "out": str},
    "data": {"train": str, "valid": str, "slides": str},
    "attach_mil": {"checkpoint": str, "model": str},
}
_TYPE_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
               bool: ("true or false", "true/false values")}


def recipe_schema() -> dict:
    """Every section and key a recipe may hold, with its type (a nested dict: a table). [cells] and [context]
    take `TrainCellsConfig`'s fields, [dense] `DenseConfig`'s, [mosaic_mil] `MosaicMILConfig`'s."""
    from wsi_vssm.training.cells import TrainCellsConfig
    from wsi_vssm.training.dense import DenseConfig
    from wsi_vssm.training.mosaic import MosaicMILConfig

    cells = _fields(TrainCellsConfig)
    tables = {**RUNNER_KEYS, "cells": cells, "context": cells, "dense": _fields(DenseConfig),
              "mosaic_mil": _fields(MosaicMILConfig)}
    return {name: tables[name] for name in ("recipe", "data", *STAGES)}  # in the shipped recipe's order


def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: _fields(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else hints[f.name]
            for f in dataclasses.fields(cls)}


def _unknown(key: list[str], known) -> str:
    """'unknown recipe key ...' for the last part of `key`, with the closest known spelling when there is one."""
    close = difflib.get_close_matches(key[-1], list(known), n=1)
    if len(key) == 1:
        what, hint = f"section [{key[0]}]", f"known: {', '.join(known)}"
    else:
        what, hint = f"key {'.'.join(key)}", "see docs/training.md"
    hint = f"did you mean {'.'.join([*key[:-1], close[0]])}?" if close else hint
    return f"unknown recipe {what}; {hint}"


def _fits(value, hint) -> bool:
    if isinstance(hint, dict):
        return isinstance(value, dict)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:  # a lone item too: the configs take one where they take a list
        (item,) = typing.get_args(hint)
        return all(_fits(v, item) for v in value) if isinstance(value, list) else _fits(value, item)
    if hint in (int, float) and isinstance(value, bool):
        return False
    if not isinstance(hint, type):  # a kind of annotation not spelled out here: the config checks it
        return True
    return isinstance(value, (int, float) if hint is float else hint)


def _type_name(hint) -> str:
    if isinstance(hint, dict):
        return "a table"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint) if h is not type(None))
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        return f"a list of {_TYPE_NAMES.get(item, ('', str(item)))[1]}"
    return _TYPE_NAMES.get(hint, (str(hint),))[0]


def _check(value, spec, key: list[str]) -> tuple[list[str], str] | None:
    """(where, what is wrong) for `value` at `key` (a table's keys recursively), or None; `what` names an
    unknown key itself."""
    import json

    if not _fits(value, spec):
        return key, f"expected {_type_name(spec)}, got {json.dumps(value, default=str)}"  # TOML-like spelling
    if isinstance(spec, dict):
        for k, v in value.items():
            problem = _check(v, spec[k], [*key, k]) if k in spec else ([], _unknown([*key, k], spec))
            if problem:
                return problem
    return None


def check_recipe(recipe: dict, source: str = "recipe") -> None:
    """UsageError naming `source` for an unknown section or key, a value of the wrong type, an empty or unknown
    stage list, or a value a stage's config refuses (`check_values`)."""
    problem = _check(recipe, recipe_schema(), []) or check_values(recipe)
    if problem:
        raise UsageError(f"{source}: {_say(*problem)}")


def recipe_stages(recipe: dict) -> list[str]:
    """recipe.stages as a list (default ["cells"]); UsageError when it is empty or names an unknown stage."""
    stages = recipe.get("recipe", {}).get("stages", ["cells"])
    stages = [stages] if isinstance(stages, str) else list(stages)
    if not stages:  # nothing would run, yet the runner would name a model file it never wrote
        raise UsageError(f"recipe.stages is empty: give at least one of {', '.join(STAGES)}")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UsageError(f"unknown recipe stage(s) {unknown}; valid: {', '.join(STAGES)}")
    return stages


def check_values(recipe: dict) -> tuple[list[str], str] | None:
    """(where, what is wrong) for the first stage whose config dataclass refuses its merged section (e.g.
    dense.grid = 5), or an empty or unknown stage list; None when all are fine. Built exactly as the stages build
    them, so a range error fails here, before any stage trains, not when its stage starts hours later. A type
    that is already wrong is `_check`'s to report: call this on a recipe that passed it."""
    try:
        stages = recipe_stages(recipe)
    except UsageError as e:
        return [], str(e)
    # the listed stages, and any other stage section given: a bad value there is a mistake too
    for stage in [s for s in STAGES if s in stages or s in recipe]:
        build = _CONFIGS.get(stage)
        if build is None:
            continue
        try:
            build(recipe)
        except (TypeError, ValueError, UsageError) as e:
            text = str(e)
            return [], text if text.startswith(f"{stage}.") else f"[{stage}] {text}"
    return None


def _cells_config(recipe: dict):
    from wsi_vssm.training.cells import TrainCellsConfig

    return TrainCellsConfig(**recipe.get("cells", {}))


def _context_config(recipe: dict, init: str | None = None):
    from wsi_vssm.training.cells import TrainCellsConfig

    return TrainCellsConfig(**{**recipe.get("cells", {}), **recipe.get("context", {}), "init": init})


def _dense_config(recipe: dict, resume: bool = False):
    from wsi_vssm.training.dense import DenseConfig

    return DenseConfig(**{"valid_select": recipe.get("cells", {}).get("valid_select", 1000),
                          **recipe.get("dense", {}), **({"resume": True} if resume else {})})


def _mosaic_config(recipe: dict):
    from wsi_vssm.training.mosaic import MosaicMILConfig

    return MosaicMILConfig(**recipe.get("mosaic_mil", {}))


_CONFIGS = {"cells": _cells_config, "context": _context_config, "dense": _dense_config,
            "mosaic_mil": _mosaic_config}


def precision_overrides(precision: str) -> list[str]:
    """`section.precision=...` for every stage section whose config has a precision (from the schema, so a new
    stage with one is not missed; [context] too, as it may set its own over [cells])."""
    schema = recipe_schema()
    return [f'{s}.precision="{precision}"' for s in STAGES if "precision" in schema[s]]


def _say(where: list[str], what: str) -> str:
    return f"{'.'.join(where)}: {what}" if where else what


def _spec_at(schema: dict, key: list[str], item: str):
    """The type a dotted `--set` key takes; UsageError naming its first unknown part."""
    spec = schema
    for i, part in enumerate(key):
        if not isinstance(spec, dict):
            raise UsageError(f"--set {item}: {'.'.join(key[:i])} is not a table")
        if part not in spec:
            raise UsageError(f"--set {item}: {_unknown(key[: i + 1], spec)}")
        spec = spec[part]
    return spec


def load_recipe(path: str | os.PathLike) -> dict:
    """The recipe file, its keys and value types checked (`check_recipe`)."""
    import tomllib

    try:
        with open(path, "rb") as f:
            recipe = tomllib.load(f)
    except OSError as e:
        raise UsageError(f"cannot read recipe {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not a TOML recipe: not UTF-8 text (byte {e.start})") from e
    check_recipe(recipe, str(path))
    return recipe


def apply_overrides(recipe: dict, sets: list[str]) -> dict:
    """`section.key=value` assignments (nested keys with dots); values parsed as TOML when they parse, except
    for keys that take a string (a path named `2024` stays a string). Unknown keys and wrong types: UsageError."""
    out = _assign(recipe, sets)
    _check_set_values(recipe, out, sets)
    return out


def _assign(recipe: dict, sets: list[str]) -> dict:
    """A copy of `recipe` with the assignments made, each key and value type checked."""
    import tomllib

    schema = recipe_schema()
    out = copy.deepcopy(recipe)
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set needs KEY=VALUE, got {item!r}")
        parts = key.strip().split(".")
        spec = _spec_at(schema, parts, item)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare path or word
        if not isinstance(value, str) and _fits(raw, spec) and not _fits(value, spec):
            value = raw
        problem = _check(value, spec, parts)
        if problem:
            where, what = problem
            raise UsageError(f"--set {item}: {_say([] if where == parts else where, what)}")
        *parents, leaf = parts
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {key}: {p!r} is not a table")
        node[leaf] = value
    return out


def _check_set_values(before: dict, after: dict, sets: list[str]) -> None:
    """UsageError naming the first `--set` after which a stage's config refuses its values (check_values);
    checked on the whole result first, since two assignments may only agree together."""
    problem = check_values(after)
    if problem is None:
        return
    if check_values(before) is not None:  # the recipe was bad before any --set (a library call)
        raise UsageError(f"recipe: {_say(*problem)}")
    for k in range(1, len(sets) + 1):
        found = check_values(_assign(before, sets[:k]))
        if found is not None:
            raise UsageError(f"--set {sets[k - 1]}: {_say(*found)}")


PROGRESS_JSON = "recipe.progress.json"  # the stages finished in OUT, each with the settings it ran with
CHECKPOINTS = {"cells": "cells.checkpoint.pt", "context": "context.checkpoint.pt", "dense": "dense/checkpoint.pt"}


def run_recipe(recipe: dict, out: Path, progress: bool = True, resume: bool = False) -> Path:
    """Run the stages in order; returns the model file (OUT/model.pt). Each finished stage leaves its model as
    OUT/<stage>.pt and is recorded in OUT/recipe.progress.json with its settings. `resume`: a stage finished
    before with the same settings (and the same stages before it) is skipped; the cells, context and dense
    stages continue from their per-epoch checkpoints. A stage that runs makes the records and checkpoints of
    every later stage (in STAGES order) stale, so they are dropped. Without `resume`, an interrupted stage's
    checkpoint stops the run before any stage trains (it is never thrown away silently)."""
    import shutil

    from wsi_vssm.atomic import atomic_write_json
    from wsi_vssm.training.checkpoint import refuse_unless_resuming

    check_recipe(recipe)  # its tables, value types and every stage's values, so the lines below need not
    stages = recipe_stages(recipe)
    for stage in stages:
        if stage in CHECKPOINTS:
            own = bool(recipe.get(stage, {}).get("resume"))  # dense.resume / cells.resume in the recipe
            refuse_unless_resuming(out / CHECKPOINTS[stage], resume or own, "run --resume")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "recipe.resolved.json", recipe)
    model_path = out / "model.pt"
    done = _read_progress(out) if resume else []
    chain, previous = True, None  # chain: every stage so far was skipped as done before
    for stage in stages:
        settings = _stage_settings(recipe, stage)
        if chain and {"stage": stage, "settings": settings} in done and (out / f"{stage}.pt").is_file():
            print(f"{stage}: done before with these settings ({out / f'{stage}.pt'}); skipped (--resume)")
            previous = stage
            continue
        if chain and previous is not None:  # the skipped stages' last model is where this one starts
            shutil.copyfile(out / f"{previous}.pt", model_path)
        before = next((d["settings"] for d in done if d["stage"] == stage), None) if chain else None
        if before is not None and before != settings:  # say why hours of training run again
            print(f"{stage}: settings changed since the earlier run ({', '.join(_changed(before, settings))}); "
                  "runs again, and the stages after it")
        chain = False
        later = STAGES[STAGES.index(stage) + 1:]  # built on this stage's old model: no longer done
        done = [d for d in done if d["stage"] != stage and d["stage"] not in later]
        _drop_stale(out, later)
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
        done.append({"stage": stage, "settings": settings})  # its old record was dropped above
        atomic_write_json(out / PROGRESS_JSON, {"done": done})
        previous = stage
    if chain and previous is not None:  # every stage done before: the last one's model is the result
        shutil.copyfile(out / f"{previous}.pt", model_path)
    return model_path


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


def _read_progress(out: Path) -> list[dict]:
    import json

    try:
        doc = json.loads((out / PROGRESS_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    done = list(doc.get("done") or []) if isinstance(doc, dict) else []
    return [{**d, "settings": _same_paths(d["settings"])} if isinstance(d.get("settings"), dict) else d
            for d in done if isinstance(d, dict)]  # records written before paths were normalised compare too


def _drop_stale(out: Path, later: list[str]) -> None:
    """Checkpoints of stages after one that runs again were built on its old model: removed, with a line."""
    for stage in later:
        path = out / CHECKPOINTS.get(stage, "-")
        if path.is_file():
            path.unlink()
            print(f"{stage}: its checkpoint {path} was built on an earlier stage that runs again: removed")


def _patch_data(recipe: dict) -> dict:
    """The recipe's [data] table, with its two patch sources present."""
    data = recipe.get("data", {})
    for key in ("train", "valid"):
        if not data.get(key):
            raise UsageError(f"recipe needs data.{key}: give it with --set data.{key}=PATH")
    return data


def _stage_cells(recipe: dict, model_path: Path, out: Path, progress: bool, resume: bool = False) -> None:
    from wsi_vssm.training.cells import train_cells

    data = _patch_data(recipe)
    cfg = _cells_config(recipe)  # its values were checked with the recipe's (check_values)
    cfg = dataclasses.replace(cfg, resume=resume or cfg.resume)
    r = train_cells(data["train"], data["valid"], model_path, cfg, slides=data.get("slides") or None,
                    progress=progress, checkpoint_path=out / CHECKPOINTS["cells"])
    print(f"cells: best epoch {r.best_epoch} of {len(r.log)}, valid(select) AUC {r.select['auc']:.4f}"
               + (f", held-back valid AUC {r.holdout['auc']:.4f}" if r.holdout else "") + f" ({r.seconds:.0f} s)")


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
    cfg = dataclasses.replace(cfg, resume=resume or cfg.resume)
    r = train_cells(data["train"], data["valid"], model_path, cfg, progress=progress,
                    log_path=out / "context.log.csv", checkpoint_path=out / CHECKPOINTS["context"])
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
    from wsi_vssm.training.mil import mil_provenance

    ckpt = recipe.get("attach_mil", {}).get("checkpoint")
    if not ckpt:
        raise UsageError("stage attach_mil needs attach_mil.checkpoint (--set attach_mil.checkpoint=PATH)")
    # attach_mil.model: the slide model to attach to (a file or 'default'), else the earlier stages' OUT/model.pt
    base = recipe.get("attach_mil", {}).get("model") or model_path
    model = attach_mil(load_model(base), ckpt)
    meta = dict(model.metadata)
    old = meta.get("slide_threshold", meta.get("threshold"))
    # the old threshold was chosen for the old head; the MIL trainer chooses none, so the neutral one is stated
    meta["slide_threshold"] = meta["threshold"] = 0.5
    meta["mil_stage"] = {"method": "attached MIL checkpoint", "checkpoint": os.path.abspath(ckpt),
                         "slide_threshold": "0.5: not chosen on data (the trainer stores none)",
                         **mil_provenance(ckpt)}
    save_model(model, model_path, meta)
    print(f"attach_mil: MIL head from {ckpt}; slide_threshold 0.5 (was {old}, chosen for the previous head): "
          "uncalibrated, choose one on your own selection slides (predict --threshold)")
