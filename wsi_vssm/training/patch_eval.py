"""Scoring a cell model on labelled patches: centre-token probabilities (optionally with 8-view TTA), patches
scored in context (tiled into mosaics), centre-token features, and the summary figures of both.

PCam labels the centre 32 px of a 96 px patch, which is the centre token of the cell head's 3 x 3 map.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from wsi_vssm.models.inputs import normalise_batch as normalise
from wsi_vssm.models.slide_model import SlideModel
from wsi_vssm.outputs.report import roc_auc_or_nan
from wsi_vssm.training.data.patches import PatchDataset, collate_uint8, mosaic_order


def centre_logits(model: SlideModel, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, 96, 96) normalised -> (B,): the cell-head logit of the centre token (PCam's labelled 32 px)."""
    logits = model.cell_logits(x)  # (B, h, w)
    return logits[:, logits.shape[1] // 2, logits.shape[2] // 2]


@torch.no_grad()
def predict_patches(model: SlideModel, ds: PatchDataset, batch_size: int = 128, progress: bool = False,
                    tta: bool = False) -> np.ndarray:
    """Centre-token tumour probabilities (float64: float32's sigmoid ties every logit above 16.6 at 1.0) for
    every patch of `ds`. `tta`: the mean probability over the 8 flips and quarter turns of each patch (the centre
    token stays the centre); off, as in training's selection."""
    model.eval()
    dev = device_of(model)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_uint8, num_workers=0)
    out = []
    for x, _ in progress_bar(loader, progress, "predict"):
        x = normalise(x.to(dev).float() / 255)
        views = [torch.rot90(v, k, (2, 3)) for v in (x, x.flip(3)) for k in range(4)] if tta else [x]
        out.append(torch.stack([torch.sigmoid(centre_logits(model, v).double()) for v in views]).mean(0).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def evaluate(model: SlideModel, ds: PatchDataset, progress: bool = False, tta: bool = False) -> dict:
    """{"n", "loss", "auc", "accuracy"} of the centre-token predictions at threshold 0.5."""
    p = predict_patches(model, ds, progress=progress, tta=tta)
    y = ds.labels.astype(np.float64)
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    loss = float(-(y * np.log(pc) + (1 - y) * np.log(1 - pc)).mean())
    return {"n": len(ds), "loss": loss, "auc": roc_auc_or_nan(y, p), "accuracy": float(((p >= 0.5) == y).mean())}


@torch.no_grad()
def predict_in_mosaics(model: SlideModel, ds: PatchDataset, grid: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of patches scored in context: a seeded order of `ds` tiled into grid x grid
    mosaics, each patch read at its centre token of the mosaic's token map (left-over patches are not scored)."""
    from wsi_vssm.synth.mosaic import tile

    model.eval()
    dev = device_of(model)
    n = grid * grid
    order = mosaic_order(len(ds), grid, seed)
    probs = []
    for s in range(0, len(order), n):
        img = tile([ds[int(i)][0] for i in order[s:s + n]], grid)
        x = normalise(torch.from_numpy(img).permute(2, 0, 1)[None].to(dev).float() / 255)
        logits = model.cell_logits(x)[0]
        per = logits.shape[0] // grid
        probs.append(torch.sigmoid(logits[per // 2::per, per // 2::per]).reshape(-1).cpu().numpy())
    p = np.concatenate(probs) if probs else np.zeros(0)
    return ds.labels[order], p


def evaluate_in_mosaics(model: SlideModel, ds: PatchDataset, grid: int, seed: int = 0) -> dict:
    """{"n", "auc", "accuracy"} of patches scored inside mosaics (see `predict_in_mosaics`)."""
    y, p = predict_in_mosaics(model, ds, grid, seed)
    accuracy = float(((p >= 0.5) == y).mean()) if len(y) else math.nan
    return {"n": len(y), "auc": roc_auc_or_nan(y, p), "accuracy": accuracy}


@torch.no_grad()
def centre_features(model: SlideModel, ds: PatchDataset, batch_size: int = 128, progress: bool = False):
    """(N, F) centre-token features of every patch of `ds`."""
    model.eval()
    dev = device_of(model)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_uint8, num_workers=0)
    out = []
    for x, _ in progress_bar(loader, progress, "features"):
        f = model.cell_features(normalise(x.to(dev).float() / 255))  # (B, F, h, w)
        out.append(f[:, :, f.shape[2] // 2, f.shape[3] // 2].cpu())
    return torch.cat(out)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def progress_bar(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (a log file would fill with redraws); the per-epoch
    # lines still print
    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True, disable=None)


# ---------------------------------------------------------------------------------------------------- entry
def _one_spelling(parser):
    """An argparse action for an option with an old name beside its new one: `--part select --split holdout` is
    refused (exit 2) rather than letting the last spelling win silently."""
    import argparse

    class OneSpelling(argparse.Action):
        def __call__(self, _parser, namespace, value, option_string=None):
            seen = namespace.__dict__.setdefault("_spelt", {})
            if self.dest in seen and seen[self.dest][1] != value:
                parser.error(f"{seen[self.dest][0]} {seen[self.dest][1]} and {option_string} {value} say different "
                             "things; give one")
            seen[self.dest] = (option_string, value)
            setattr(namespace, self.dest, value)

    return OneSpelling


def main(argv=None) -> int:
    """`python -m wsi_vssm.training.cells --evaluate MODEL --valid DIR` (cells.main calls this): a model's patch
    AUC on the training split's selection or held-back part, with TTA and in mosaics (the model card's figures)."""
    import argparse

    from wsi_vssm.errors import UsageError, WsiVssmError, warn_in_one_line
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.resources import available_cpus
    from wsi_vssm.training.data.patches import select_and_holdout, training_patches

    ap = argparse.ArgumentParser(prog="python -m wsi_vssm.training.cells", description="Evaluate a model on patches.")
    ap.add_argument("--evaluate", required=True, help="model file, or 'default'")
    ap.add_argument("--valid", required=True, help="folder or tar in ImageFolder layout")
    one_spelling = _one_spelling(ap)
    ap.add_argument("--part", "--split", dest="part", choices=("all", "select", "holdout"), default="all",
                    action=one_spelling,
                    help="the seeded stratified parts training splits valid into (select / held back), as `synth "
                         "--part` names them (--split, the older name, still works)")
    ap.add_argument("--split-seed", "--seed", dest="seed", type=int, default=0, action=one_spelling,
                    help="the seed training split with (`train cells --seed`), as `synth --split-seed`; it also seeds "
                         "--in-mosaics' tiling (--seed, the older name, still works)")
    ap.add_argument("--valid-select", type=int, default=None, help="as in training: patches used to select")
    ap.add_argument("--tta", action="store_true", help="also score the mean over the 8 flips/quarter turns")
    ap.add_argument("--in-mosaics", type=int, default=0, metavar="GRID",
                    help="also score the patches in context: tiled GRID x GRID, read at their centre tokens")
    a = ap.parse_args(argv)
    warn_in_one_line(ap.prog)
    if "OMP_NUM_THREADS" not in os.environ:  # a container's CPU quota, not the host's cores (torch is loaded)
        torch.set_num_threads(min(torch.get_num_threads(), available_cpus()))
    try:  # bad input is one line and exit 1, as on the wsi-vssm command line (it was a traceback)
        model = load_model(a.evaluate)
        ds = training_patches(a.valid)  # undecodable patches left out with a warning; mixed sizes refused
        if a.part != "all":
            ds = select_and_holdout(ds, a.valid_select, a.seed)[0 if a.part == "select" else 1]
        if len(set(ds.labels.tolist())) < 2:
            raise UsageError(f"{a.valid}: patches of one class only: an AUC needs both 0/ and 1/")
    except WsiVssmError as e:
        print(f"python -m wsi_vssm.training.cells: error: {e}", file=sys.stderr)
        return 1
    for tta in (False, True) if a.tta else (False,):
        m = evaluate(model, ds, progress=True, tta=tta)
        print(f"{a.evaluate} on {a.valid} [{a.part}]{' 8-view TTA' if tta else ''} n={m['n']}: AUC {m['auc']:.4f} "
              f"accuracy {m['accuracy']:.4f} loss {m['loss']:.4f}")
    if a.in_mosaics:
        m = evaluate_in_mosaics(model, ds, a.in_mosaics, a.seed)
        print(f"{a.evaluate} on {a.valid} [{a.part}] in {a.in_mosaics} x {a.in_mosaics} mosaics n={m['n']}: "
              f"AUC {m['auc']:.4f} accuracy {m['accuracy']:.4f}")
    return 0
