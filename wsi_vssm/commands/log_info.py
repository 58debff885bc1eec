"""`wsi-vssm info` on a training log (`train mil`, `train cells` and the recipe's dense stage write one row per
epoch, CSV or JSON) and on a folder of training outputs: what they are, instead of "not a slide format"."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

# the column each stage selects on, in the order looked for (the dense stage's `score`, the others' AUC)
SELECTION_COLUMNS = ("score", "valid_auc")
MODEL_SUFFIXES_SHOWN = (".pt", ".pth", ".safetensors")


def read_train_log(path: str) -> list[dict] | None:
    """The rows of a per-epoch training log (first column `epoch`, a `best` column), or None for any other file;
    read only when its first bytes say so, so slides are never read whole here."""
    p = Path(path)
    if p.suffix.lower() not in (".csv", ".json") or not p.is_file():
        return None
    try:
        with open(p, encoding="utf-8", newline="") as f:
            head = f.read(64)
            f.seek(0)
            if p.suffix.lower() == ".csv":
                if not head.startswith("epoch,"):
                    return None
                rows = list(csv.DictReader(f))
            else:
                if not head.lstrip().startswith("[") or '"epoch"' not in head:
                    return None
                rows = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, csv.Error):
        return None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "epoch" in r and "best" in r for r in rows):
        return None
    return rows


def train_log_info(path: str, rows: list[dict]) -> dict:
    """Epochs, the best one (the last row marked best) with its selection figure, the last row's, and time."""
    column = next((c for c in SELECTION_COLUMNS if rows and c in rows[0]), None)
    best = [r for r in rows if _number(r.get("best")) == 1]
    seconds = [_number(r.get("seconds")) for r in rows]
    stage = "dense" if rows and "phase" in rows[0] else "cells" if rows and "valid_acc" in rows[0] else "mil"
    return {
        "path": str(Path(path).absolute()), "kind": "train_log", "stage": stage, "epochs": len(rows),
        "selected_on": column,
        "best_epoch": _number(best[-1]["epoch"]) if best else None,
        "best_value": _number(best[-1].get(column)) if best and column else None,
        "last_value": _number(rows[-1].get(column)) if rows and column else None,
        "seconds": round(sum(s for s in seconds if s is not None), 1),
    }


def format_train_log_info(r: dict) -> str:
    what = {"mil": "`train mil` (the slide head)", "cells": "`train cells` (backbone and cell head)",
            "dense": "the recipe's dense stage (`run`)"}[r["stage"]]
    lines = [f"training log: {r['path']}", f"kind:         a per-epoch log of {what}",
             f"epochs:       {r['epochs']} ({r['seconds'] / 60:.1f} min)"]
    if r["best_epoch"] is None:
        lines.append("best:         no epoch marked best yet")
    elif r["selected_on"] is None:  # a log of another shape: its best epoch, no figure to quote
        lines.append(f"best:         epoch {r['best_epoch']:g}")
    else:
        lines.append(f"best:         epoch {r['best_epoch']:g}, {r['selected_on']} {_text(r['best_value'])} (last "
                     f"epoch: {_text(r['last_value'])}); the model file beside it holds the best epoch's weights")
    return "\n".join(lines)


def folder_contents_problem(path: str) -> str | None:
    """For a plain folder that holds model files or training logs but no slide: one line saying what it holds
    and what to give instead (train mil's --out folder, say); None for anything else."""
    p = Path(path)
    if not p.is_dir() or (p / "zarr.json").is_file() or (p / ".zattrs").is_file():
        return None
    try:
        files = sorted(c for c in p.iterdir() if c.is_file())
    except OSError:
        return None
    models = [c.name for c in files if c.suffix.lower() in MODEL_SUFFIXES_SHOWN]
    logs = [c.name for c in files if read_train_log(str(c)) is not None]
    if not models and not logs:
        return None
    held = " and ".join(part for part in (_names("model file", models), _names("training log", logs)) if part)
    return f"{path}: a folder of training outputs, not a slide: it holds {held}; give one of them to `wsi-vssm info`"


def _names(what: str, names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} {what}{'s' if len(names) > 1 else ''} ({shown})"


def _number(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _text(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"
