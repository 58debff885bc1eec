"""`wsi-vssm info MODEL.pt`: what a model file is (architecture, resolution, thresholds, domain, identity, how it
was trained), for people who pass model files between machines and want to know one before they predict."""

from __future__ import annotations

from pathlib import Path

MODEL_SUFFIXES = (".pt", ".pth")  # no slide format uses them
PACKAGED_MODEL = "default"  # models.model_file.DEFAULT_NAME, spelt here: importing it loads torch (1.9 s, 360 MB)
# for every `info SLIDE`
# the model metadata's data records, and what `info` calls them
PART_NAMES = {"train_data": "trained on", "valid_select": "selected on", "valid_holdout": "held back"}


def is_model_path(path: str) -> bool:
    """A model file by its suffix, or `default` (the packaged model) where no such file lies here."""
    return Path(path).suffix.lower() in MODEL_SUFFIXES or (path == PACKAGED_MODEL and not Path(path).exists())


def model_info(path: str) -> dict:
    """The facts `info` prints for a model file, JSON-ready; for a MIL checkpoint of `train mil`, its own
    (`mil_head_info`, kind `mil_head`; it was refused, "attach it first"); any other file is a ModelFileError."""
    from wsi_vssm.models.export import arch_name
    from wsi_vssm.models.mil import head_summary
    from wsi_vssm.models.model_file import ModelFileError
    from wsi_vssm.models.slide_model import load_model, model_identity, resolve_model_path
    from wsi_vssm.pipeline.predict import model_thresholds
    from wsi_vssm.training.data.fingerprints import recorded

    path = resolve_model_path(path)
    try:
        model = load_model(path)
    except ModelFileError:
        head = mil_head_info(path) or training_checkpoint_info(path)  # users try `info` on those too
        if head is None:
            raise
        return head
    meta = model.metadata
    slide_t, cell_t = model_thresholds(model, warn=False)
    trained_on = {k: meta[k] for k in PART_NAMES if isinstance(meta.get(k), dict)}
    known = {part: len(digests) for part in ("train", "select") if (digests := recorded(meta, part)) is not None}
    return {
        "path": str(Path(path).absolute()), "kind": "model", "name": model.name,
        "backbone": arch_name(model.backbone.config), "mpp": model.mpp, "token_px": model.token_px,
        "slide_head": head_summary(model.mil.config),
        "slide_threshold": slide_t, "cell_threshold": cell_t, "calibrated": "cell_threshold" in meta,
        "lesion_extent_threshold": meta.get("lesion_extent_threshold"),
        "lesion_merge_distance_cells": meta.get("lesion_merge_distance_cells"),
        **model_identity(model), "trained_on": trained_on, "date": meta.get("date"),
        "package_version": meta.get("package_version"),
        "training_incomplete": bool(meta.get("training_incomplete")),
        "patch_fingerprints": known or None,  # distinct patches known by their files: evaluate warns of them
        "attached_head": _attached_head(meta.get("mil_stage")),
    }


def _attached_head(stage) -> dict | None:
    """Where a slide head attached from a `train mil` checkpoint (`run ... attach_mil`) came from, as the model's
    metadata records it: the checkpoint, its slides, where selection stopped, the features' extract settings."""
    if not isinstance(stage, dict) or stage.get("method") != "attached MIL checkpoint":
        return None
    feats = stage.get("features") if isinstance(stage.get("features"), dict) else {}
    return {"checkpoint": stage.get("checkpoint"), "train_slides": len(stage.get("train_slides") or []),
            "valid_slides": len(stage.get("valid_slides") or []), "best_epoch": stage.get("best_epoch"),
            "epochs": stage.get("epochs"), "member_best_epochs": _member_best_epochs(stage),
            "valid_auc": stage.get("valid_auc"),
            "features": {k: feats.get(k) for k in ("region_px", "overlap_px", "min_tissue")}}


def _member_best_epochs(meta: dict) -> list | None:
    """Each ensemble member's best epoch (a `train mil --ensemble` head has no one best epoch)."""
    members = meta.get("members")
    return [m.get("best_epoch") for m in members if isinstance(m, dict)] if isinstance(members, list) else None


def mil_head_info(path) -> dict | None:
    """What a MIL checkpoint of `train mil` is (its pool, the features it was trained on, its slides and where
    selection stopped), or None when `path` is no such file."""
    from wsi_vssm.models.checkpoint import CheckpointError, read_checkpoint
    from wsi_vssm.models.mil import MILConfig, head_summary
    from wsi_vssm.models.model_file import MIL_FORMAT

    try:
        ckpt = read_checkpoint(path)
    except CheckpointError:
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") != MIL_FORMAT:
        return None
    try:
        cfg = MILConfig(**(ckpt.get("mil_config") or {}))
    except (TypeError, ValueError):  # not a head this version can describe: the model reader's error stands
        return None
    meta = ckpt.get("metadata") if isinstance(ckpt.get("metadata"), dict) else {}
    feats = meta.get("features") if isinstance(meta.get("features"), dict) else {}
    return {
        "path": str(Path(path).absolute()), "kind": "mil_head", "slide_head": head_summary(cfg), "in_dim": cfg.in_dim,
        "features": {k: feats.get(k) for k in ("model_id", "model_hash", "mpp", "token_px", "region_px",
                                               "overlap_px", "min_tissue")},
        "train_slides": len(meta.get("train_slides") or []), "valid_slides": len(meta.get("valid_slides") or []),
        "seed": meta.get("seed"), "epochs": meta.get("epochs"), "best_epoch": meta.get("best_epoch"),
        "member_best_epochs": _member_best_epochs(meta),
        "valid_auc": meta.get("valid_auc"), "trained_cell_head":
            bool((meta.get("train_config") or {}).get("train_cell_head")),
        "date": meta.get("date"), "package_version": meta.get("package_version"),
        "training_incomplete": bool(meta.get("training_incomplete")),
    }


def training_checkpoint_info(path) -> dict | None:
    """What a per-epoch checkpoint of `train cells` or of the recipe's stages is (the epoch it was saved after,
    the best so far), or None when `path` is no such file. Read as a resume reads it (weights only)."""
    from wsi_vssm.training.checkpoint import FORMAT, peek_checkpoint

    try:
        ck = peek_checkpoint(Path(path))
    except Exception:  # noqa: BLE001 - anything unreadable is no checkpoint: the model reader's error stands
        return None
    if ck.get("format") != FORMAT:
        return None
    st = ck.get("state") if isinstance(ck.get("state"), dict) else ck  # the dense stage keeps its counters apart
    return {"path": str(Path(path).absolute()), "kind": "training_checkpoint",
            "stage": "dense" if "state" in ck else "cells", "epoch": st.get("epoch"),
            "best_epoch": st.get("best_epoch")}


def format_checkpoint_info(r: dict) -> str:
    what = "the dense stage's" if r["stage"] == "dense" else "`train cells`' (or a recipe's cells or context stage)"
    return "\n".join([f"checkpoint:  {r['path']}",
                      f"kind:        {what} per-epoch training checkpoint, not a model file",
                      f"epochs:      saved after epoch {r['epoch']} (best so far: epoch {r['best_epoch']})",
                      "go on:       rerun the command that made it with --resume (`run RECIPE --out RUN --resume`); "
                      "remove it to start over"])


def format_mil_head_info(r: dict) -> str:
    f, auc = r["features"], r["valid_auc"]
    lines = [
        f"MIL head:    {r['path']}",
        "kind:        a slide head from `wsi-vssm train mil`, not a slide model: attach it to one to predict "
        "(`run ... attach_mil`, docs/features.md)",
        f"slide head:  {r['slide_head']['pool']}"
        + (f", the mean of {r['slide_head']['members']} heads trained with different seeds"
           if r["slide_head"]["members"] > 1 else "")
        + ("; its cell head trained too" if r["trained_cell_head"] else ""),
        f"features:    {r['in_dim']} per cell, of backbone {str(f.get('model_hash') or '?')[:12]} "
        f"({f.get('model_id') or '?'}), {f.get('mpp')} um/px, one cell per {f.get('token_px')} px",
        *_extract_settings_line(f),
        f"slides:      {r['train_slides']} trained it, {r['valid_slides']} selected it ({_where_stopped(r)}; "
        f"valid AUC {'n/a' if auc is None else f'{auc:.3f}'})",
    ]
    if r["date"]:
        lines.append(f"made:        {r['date']} with wsi-vssm {r['package_version'] or '?'}")
    if r["training_incomplete"]:
        lines.append("state:       the best head so far of a training run that has not finished")
    return "\n".join(lines)


def _where_stopped(r: dict) -> str:
    """"best epoch 7 of 12", or for an ensemble (epochs per member, no one best epoch) each member's."""
    if isinstance(r["epochs"], list):
        best = r.get("member_best_epochs") or ["?"] * len(r["epochs"])
        return "best epochs per seed " + ", ".join(f"{b} of {n}" for b, n in zip(best, r["epochs"], strict=False))
    return f"best epoch {r['best_epoch']}" + (f" of {r['epochs']}" if r.get("epochs") is not None else "")


def _extract_settings_line(f: dict, label: str = "extracted:   ") -> list[str]:
    """The extract settings of the features a head was trained on; none for a head older than their record."""
    if f.get("region_px") is None:
        return []

    def value(key: str) -> str:
        v = f.get(key)
        return f"mixed ({', '.join(map(str, v))})" if isinstance(v, list) else str(v)

    return [f"{label}regions {value('region_px')} px, overlap {value('overlap_px')} px, min tissue "
            f"{value('min_tissue')}" + ("; mixed settings: re-extract with one to train on like features"
                                         if any(isinstance(f.get(k), list) for k in f) else "")]


def format_model_info(r: dict) -> str:
    if r["kind"] == "mil_head":
        return format_mil_head_info(r)
    if r["kind"] == "training_checkpoint":
        return format_checkpoint_info(r)
    lines = [
        f"model:       {r['path']}",
        f"kind:        a wsi-vssm model file ({r['name']}), not a slide",
        f"backbone:    {r['backbone']}, one cell per {r['token_px']} px at {r['mpp']} um/px (slides are read there)",
        f"slide head:  {r['slide_head']['pool']}"
        + (f", the mean of {r['slide_head']['members']} heads trained with different seeds"
           if r["slide_head"]["members"] > 1 else ""),
        f"thresholds:  slide {r['slide_threshold']:.3f}, cell {r['cell_threshold']:.3f}"
        + ("" if r["calibrated"] else " (no calibrated cell threshold: cells are called at 0.5)"),
        f"domain:      {r['domain']}",
        f"identity:    weights {r['weights_hash'][:12]}, file sha256 {r['sha256'][:12]}",
    ]
    for part, d in r["trained_on"].items():
        lines.append(f"{PART_NAMES[part] + ':':<13}{d.get('source', '?')} ({d.get('n', '?')} patches)")
    head = r.get("attached_head")
    if head:  # the slide head did not come from those patches: say where it did
        auc = head["valid_auc"]
        lines.append(f"head from:   {head['checkpoint']} (`train mil`): {head['train_slides']} slides trained it, "
                     f"{head['valid_slides']} selected it ({_where_stopped(head)}; valid AUC "
                     f"{'n/a' if not isinstance(auc, float | int) else f'{auc:.3f}'})")
        lines += _extract_settings_line(head["features"], "head extract: ")
    if r["patch_fingerprints"]:
        fp = r["patch_fingerprints"]
        lines.append(f"remembers:   {fp.get('train', 0)} training and {fp.get('select', 0)} selection patch files "
                     "(distinct; evaluate warns when a patch folder holds them)")
    if r["date"]:
        lines.append(f"made:        {r['date']} with wsi-vssm {r['package_version'] or '?'}")
    if r["training_incomplete"]:
        lines.append("state:       the best epoch so far of a training run that has not finished")
    return "\n".join(lines)
