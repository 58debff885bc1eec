"""Token-level scoring for the dense stage: every token of patches tiled into mosaics, hard-negative mining, and
the calibration of the cell head (Platt scaling folded into its weights, a threshold for a token specificity).

Token kinds in a mosaic of patches: the centre token of a label-1 patch is a positive; every token of a label-0
patch (centre and rim) is a negative of normal tissue; the rim of a label-1 patch is unknown and only recorded.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from wsi_vssm.models.inputs import normalise_batch as normalise
from wsi_vssm.outputs.report import roc_auc_or_nan
from wsi_vssm.training.patch_eval import device_of


@torch.no_grad()
def mosaic_token_logits(model, ds, grid: int, seed: int = 0, order: np.ndarray | None = None, tta: bool = False):
    """Patches of `ds` (a seeded order, or `order`) tiled grid x grid; returns (indices scored, (N, 3, 3) cell
    logits of each patch's tokens read off the mosaic's token map). Left-over patches are not scored. `tta`: the
    cell head on the mean feature map of the 8 flips and quarter turns, as `predict --tta` makes it."""
    from wsi_vssm.pipeline.extract import region_features
    from wsi_vssm.synth.mosaic import tile

    model.eval()
    dev = device_of(model)
    n = grid * grid
    if order is None:
        order = np.random.default_rng(seed).permutation(len(ds))
    order = np.asarray(order)[: len(order) // n * n]
    out = []
    for s in range(0, len(order), n):
        img = tile([ds[int(i)][0] for i in order[s:s + n]], grid)
        x = normalise(torch.from_numpy(img).permute(2, 0, 1)[None].to(dev).float() / 255)
        if tta:
            logits = model.cell_logits_of_map(region_features(model.backbone, x, True))[0].float().cpu().numpy()
        else:
            logits = model.cell_logits(x)[0].float().cpu().numpy()  # (3g, 3g)
        out.append(logits.reshape(grid, 3, grid, 3).transpose(0, 2, 1, 3).reshape(n, 3, 3))
    return order, (np.concatenate(out) if out else np.zeros((0, 3, 3), np.float32))


def split_tokens(labels: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
    """Token logits by kind: positives (label-1 centres), negative centres, negative rims, positive rims."""
    rim = np.ones((3, 3), bool)
    rim[1, 1] = False
    pos, neg = labels == 1, labels == 0
    return {"pos": logits[pos, 1, 1], "neg_centre": logits[neg, 1, 1], "neg_rim": logits[neg][:, rim].reshape(-1),
            "pos_rim": logits[pos][:, rim].reshape(-1)}


def token_metrics(tokens: dict[str, np.ndarray], specificity: float = 0.995) -> dict:
    """AUCs of positives against negative centres and against every negative token, and the sensitivity at the
    logit that keeps `specificity` of the negative tokens below it."""
    neg = np.concatenate([tokens["neg_centre"], tokens["neg_rim"]])
    pos = tokens["pos"]

    def auc(p, n):
        return roc_auc_or_nan(np.r_[np.ones(len(p)), np.zeros(len(n))], np.r_[p, n])

    cut = float(np.quantile(neg, specificity)) if len(neg) else math.nan
    return {"centre_auc": auc(pos, tokens["neg_centre"]), "dense_auc": auc(pos, neg),
            f"sensitivity_at_{specificity:g}": float((pos > cut).mean()) if len(pos) else math.nan,
            "rim_noise": rim_noise(tokens)}


def rim_noise(tokens: dict[str, np.ndarray], q: float = 0.99) -> float:
    """How much more often the rim of a label-0 patch looks like tumour than its (labelled) centre: the share
    of negative rim tokens above the negative centres' `q` quantile, minus 1 - q. An estimate of the rim
    label noise (tumour in the unlabelled rim of a normal-centred patch), floored at 0."""
    if not len(tokens["neg_centre"]) or not len(tokens["neg_rim"]):
        return math.nan
    cut = np.quantile(tokens["neg_centre"], q)
    return max(0.0, float((tokens["neg_rim"] > cut).mean()) - (1 - q))


@torch.no_grad()
def mine_hard_negatives(model, train, grid: int, top: float, seed: int) -> tuple[np.ndarray, dict]:
    """Score every training negative in context (negatives tiled grid x grid, a seeded order; the worst of
    its nine tokens counts) and return the `top` share with the highest scores, plus a summary."""
    neg = np.flatnonzero(np.asarray(train.labels) == 0)
    order = np.random.default_rng([seed, 7]).permutation(neg)
    scored, logits = mosaic_token_logits(model, train, grid, order=order)
    worst = logits.reshape(len(scored), -1).max(1)
    k = max(1, int(round(top * len(scored))))
    pick = np.argsort(worst)[-k:]
    prob = 1 / (1 + np.exp(-worst))
    return scored[pick], {"scored": int(len(scored)), "pool": int(k), "share_any_token_above_0.5":
                          float((prob > 0.5).mean()), "pool_min_prob": float(prob[pick].min())}


def fit_platt(logits: np.ndarray, labels: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """(a, b) minimising the log loss of sigmoid(a * logit + b) (Newton's method on two parameters)."""
    a, b = fit_logistic([logits], labels, iters)
    return a, b


def fit_platt_sized(logits: np.ndarray, log_cells: np.ndarray, labels: np.ndarray,
                    iters: int = 100) -> tuple[float, float, float]:
    """(a, b, c) minimising the log loss of sigmoid(a * logit + b + c * log_cells): Platt scaling with a
    bag-size term, for slide heads whose logit drifts with the number of cells."""
    a, c, b = fit_logistic([logits, log_cells], labels, iters)
    return a, b, c


def fit_logistic(columns, labels: np.ndarray, iters: int = 100) -> tuple[float, ...]:
    """Weights of each column, then the offset, minimising the log loss of sigmoid(sum w_i x_i + b) by Newton's
    method, started from w = (1, 0, ...), b = 0 (a hair of ridge keeps the Hessian invertible)."""
    x = np.stack([np.asarray(c, np.float64) for c in columns] + [np.ones(len(labels))], axis=1)  # (n, k + 1)
    y = np.asarray(labels, np.float64)
    w = np.zeros(x.shape[1])
    w[0] = 1.0
    for _ in range(iters):
        p = 0.5 * (1 + np.tanh(0.5 * (x @ w)))  # the logistic function, without exp overflowing
        g = x.T @ (p - y)
        h = (x * (p * (1 - p) + 1e-12)[:, None]).T @ x + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(h, g)
        w = w - step
        if np.abs(step).max() < 1e-10:
            break
    return tuple(float(v) for v in w)


def fold_platt(linear: torch.nn.Linear, a: float, b: float) -> None:
    """Make `linear`'s logit a * logit + b in place: the head then outputs calibrated logits."""
    with torch.no_grad():
        linear.weight.mul_(a)
        linear.bias.mul_(a).add_(b)
