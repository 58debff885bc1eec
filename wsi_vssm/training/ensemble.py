"""Slide heads trained with several seeds, kept as one: the mean of their slide logits (`models.mil.MILEnsemble`).
Used by `wsi-vssm train mil --ensemble` and the recipe's `mosaic_mil.ensemble`."""

from __future__ import annotations

import os

from wsi_vssm.models.mil import MILEnsemble
from wsi_vssm.training.mil import Bags, evaluate, save_mil


def save_ensemble(heads, histories, valid: Bags, path: str | os.PathLike) -> dict:
    """Several seeds' heads of one configuration (`train_mil`'s results and histories) as one MILEnsemble, saved
    as a MIL checkpoint at `path` (what `attach_mil` reads). Its metadata is the first member's (data, features,
    settings) with `seed` and `members` (each one's seed, best epoch and valid AUC) and the ensemble's own
    `valid_auc`; `best_epoch` is null. Returns {"mil", "valid_auc", "valid_loss", "members"}."""
    mil = MILEnsemble.of(heads)
    loss, auc = evaluate(mil, valid)
    members = [{"seed": h.metadata["seed"], "best_epoch": h.best_epoch, "valid_slide_auc": h.best_valid_auc}
               for h in histories]
    first = histories[0].metadata  # the data, features and settings they share; seeds and logs are per member
    meta = {**{k: v for k, v in first.items() if k != "history"}, "seed": [m["seed"] for m in members],
            "train_config": {**first.get("train_config", {}), "seed": [m["seed"] for m in members]},
            "members": members, "epochs": [len(h.rows) for h in histories], "best_epoch": None, "valid_auc": auc,
            "valid_loss": loss}
    save_mil(path, mil, meta)
    return {"mil": mil, "valid_auc": auc, "valid_loss": loss, "members": members}
