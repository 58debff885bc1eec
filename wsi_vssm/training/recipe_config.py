"""A training recipe's contents (pipelines/*.toml): the sections and keys it may hold (`recipe_schema`, from the
stages' config dataclasses), loading one, `--set section.key=value` overrides, and the checks of all of them
before anything runs: value types, each stage's config built from its merged section (`check_values`: value
ranges, a stage list that is known, in order and without repeats). `training.recipe` runs them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing

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


def check_files(recipe: dict) -> None:
    """UsageError when a stage about to run lacks a file it needs: attach_mil's checkpoint (and model, when
    given). On the recipe as run (after every --set), before any stage trains: once, the stage found it out
    after the stages before it had trained for hours."""
    if "attach_mil" not in recipe_stages(recipe):
        return
    attach = recipe.get("attach_mil", {})
    if not attach.get("checkpoint"):
        raise UsageError("attach_mil.checkpoint: stage attach_mil needs it, the MIL head to attach "
                         "(--set attach_mil.checkpoint=PATH)")
    for key in ("checkpoint", "model"):
        path = attach.get(key)
        if path and not (key == "model" and path == "default") and not os.path.isfile(os.path.expanduser(path)):
            raise UsageError(f"attach_mil.{key}: no such file: {path}")


def recipe_stages(recipe: dict) -> list[str]:
    """recipe.stages as a list (default ["cells"]); UsageError when it is empty or names an unknown stage."""
    stages = recipe.get("recipe", {}).get("stages", ["cells"])
    stages = [stages] if isinstance(stages, str) else list(stages)
    if not stages:  # nothing would run, yet the runner would name a model file it never wrote
        raise UsageError(f"recipe.stages is empty: give at least one of {', '.join(STAGES)}")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UsageError(f"unknown recipe stage(s) {unknown}; valid: {', '.join(STAGES)}")
    # each stage starts from the one before it: out of order, a stage would build on an old model (or be
    # overwritten by an earlier one), and a repeat would train the same stage twice
    twice = sorted({s for s in stages if stages.count(s) > 1})
    if twice:
        raise UsageError(f"recipe.stages names {', '.join(twice)} twice: give each stage once")
    if stages != sorted(stages, key=STAGES.index):
        raise UsageError(f"recipe.stages {stages} are out of order: stages run in the order "
                         f"{', '.join(STAGES)} (each starts from the one before)")
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
    if recipe.get("context", {}).get("init") is not None:  # the runner always passes OUT/cells.pt
        return ["context", "init"], ("the context stage starts from the cell stage's model (OUT/cells.pt); "
                                     "to start the recipe from another model, give cells.init")
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
