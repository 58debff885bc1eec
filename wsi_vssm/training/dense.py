"""Stage "dense": continue a cell model with every token supervised, hard negatives mined in rounds, and the
cell head calibrated.

Each step takes `batch_size` isolated patches (all nine tokens labelled, `training.data.dense_mosaics`) and
mosaics of about `mosaic_cells` patches whose side varies over `grid`, with glass around the tissue and lesions
from one patch up. The loss is class-balanced: positive and negative tokens each weigh half, so a step's few
lesion tokens are not drowned by its hundreds of normal ones.

With `consistency` > 0 each step also scores its inputs under one random symmetry of the square (a quarter turn
and/or a flip), turns the token logits back, and adds `consistency` times their mean squared difference to the
loss (both views also take the token loss). Without it (r6) a turned mosaic's cells correlated with the unturned
one's at r = 0.83-0.88 (bench/heatmap_consistency.py); `predict --tta` averages the views at 8x the cost.

With `distill` > 0 the centre token of each isolated training patch also learns a soft target: the starting
model's mean probability over the patch's 8 flips and quarter turns (computed once, `OUT/dense/teacher_tta.npz`),
weighted by `distill`. The centre token is the same under every view, so the patch augmentation leaves its target.

Phases: phase 0 trains on random negatives; before each of the `rounds` later phases every training negative is
scored in context and the worst `hard_top` share becomes a pool from which `hard_share` of the negatives are drawn.
A phase ends when the selection score has not gained `min_gain` over its last `plateau` epochs (or after
`round_epochs`). The score is the mean of the isolated patch AUC and the dense in-mosaic token AUC (label-1 centres
against every token of label-0 patches) on the selection part of valid. The best epoch's weight average is kept.

Then the cell head is calibrated on the selection part (Platt scaling of the in-mosaic centre tokens, folded into
the head's weights, so heatmaps hold calibrated probabilities) and `cell_threshold` is set for a token
specificity of `token_specificity` on the selection part's normal tokens. The held-back part is scored once.

A checkpoint is written after every epoch (OUT/dense/checkpoint.pt); `resume` continues from it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsi_vssm.errors import UsageError
from wsi_vssm.models.inputs import normalise_batch as normalise
from wsi_vssm.models.precision import autocast, check_precision, resolve_precision
from wsi_vssm.training.checkpoint import load_checkpoint, refuse_unless_resuming, save_checkpoint, stamped
from wsi_vssm.training.config_checks import DENSE_RULES, check_common, check_ranges
from wsi_vssm.training.data.augment import AugmentConfig, augment_batch
from wsi_vssm.training.optim import adamw

LOG_COLUMNS = ("epoch", "phase", "train_loss", "iso_auc", "centre_auc", "dense_auc", "sensitivity_at_0.995",
               "rim_noise", "score", "lr", "seconds", "best", "view_gap")


@dataclass
class DenseConfig:
    epochs: int = 30  # over all phases
    rounds: int = 2  # hard-negative mining rounds (phases after the first)
    round_epochs: int = 10  # the most epochs of one phase
    plateau: int = 3  # a phase ends when its last `plateau` epochs gained < min_gain over its best before them
    min_gain: float = 0.002
    epoch_patches: int = 4000  # isolated patches per epoch (balanced draw); each step also takes mosaics
    batch_size: int = 32
    mosaic_cells: int = 64  # patch cells of mosaics per step
    grid: list[int] = field(default_factory=lambda: [3, 10])
    max_lesion_frac: float = 0.3
    rim_weight: float = 0.5
    background_weight: float = 0.25
    hard_share: float = 0.5
    hard_top: float = 0.1
    lr: float = 5e-4  # halved in each mining round
    weight_decay: float = 0.05
    warmup_steps: int = 50
    ema: float = 0.998
    drop_path: float = 0.1
    seed: int = 0
    valid_select: int | None = 1000
    eval_grid: int = 8
    token_specificity: float = 0.995
    consistency: float = 0.0  # weight of the two views' squared token-logit difference; 0: one view, no term
    distill: float = 0.0  # weight of the start model's 8-view TTA probability as a soft centre-token target
    precision: str = "fp32"
    scan: str = "auto"
    resume: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        check_precision(self.precision)
        check_ranges(self, DENSE_RULES, "dense.")
        check_common(self, "dense.")
        if not (isinstance(self.grid, (list, tuple)) and len(self.grid) == 2 and 2 <= self.grid[0] <= self.grid[1]):
            raise UsageError(f"dense.grid must be [low, high] patches per side, 2 <= low <= high, got {self.grid!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def train_dense(init: str | Path, train_src, valid_src, out: str | Path, cfg: DenseConfig,
                progress: bool = True) -> dict:
    """Train from the model file `init`, write the calibrated model to `out` (a model file); returns the
    stage's record (also in the file's metadata under `dense_stage`)."""
    from wsi_vssm.models.slide_model import load_model, save_model
    from wsi_vssm.training.cells import TrainCellsConfig, WeightAverage, split_valid
    from wsi_vssm.training.data.dense_mosaics import DenseMosaics, TokenWeights
    from wsi_vssm.training.data.patches import training_patches

    out = Path(out)
    work = out.parent / "dense"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train = training_patches(train_src)
    valid = training_patches(valid_src)
    select, holdout = split_valid(valid, TrainCellsConfig(seed=cfg.seed,
                                                                            valid_select=cfg.valid_select))
    model = load_model(init, scan=cfg.scan)
    model.backbone.set_drop_path(float(cfg.drop_path))
    ema = WeightAverage(model, cfg.ema)
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    weights = TokenWeights(cfg.rim_weight, cfg.background_weight)
    mosaics = DenseMosaics(train, tuple(cfg.grid), cfg.max_lesion_frac, weights)
    st = _fresh_state()
    ckpt_path = work / "checkpoint.pt"
    refuse_unless_resuming(ckpt_path, cfg.resume, "--resume (dense.resume)")
    run_config = {**cfg.to_dict(), "init": str(init), "train": train.source, "valid": valid.source}
    for key in ("consistency", "distill"):  # checkpoints from before these terms lack the keys: still resume
        if not getattr(cfg, key):
            run_config.pop(key)
    from wsi_vssm.training.checkpoint import with_start_digests

    run_config = with_start_digests(run_config, output=out)  # the start model by its contents
    if cfg.resume and ckpt_path.exists():
        st = _load_checkpoint(ckpt_path, model, ema, opt, run_config)
        if cfg.rounds < st["phase"]:  # mining rounds already run cannot be undone
            raise UsageError(f"{ckpt_path}: {st['phase']} mining rounds already ran; dense.rounds {cfg.rounds} "
                             "cannot be fewer on resume")
        if cfg.epochs < st["epoch"]:  # accepted before, and recorded as the epochs of a model that has more
            raise UsageError(f"{ckpt_path}: {st['epoch']} epochs already ran; dense.epochs {cfg.epochs} cannot be "
                             "fewer on resume")
        _say(progress, f"dense: resumed from {ckpt_path} after epoch {st['epoch']} (phase {st['phase']})")
    elif st["epoch"] == 0:
        if cfg.resume:
            _say(progress, f"dense: no checkpoint in {work} to resume from: starting from the first epoch")
        first = _select_metrics(ema.model, select, cfg)
        st["start"] = first
        _say(progress, f"dense: start (from {init}): " + _fmt(first))
    teacher = _teacher(init, cfg, train, work, progress) if cfg.distill and st["epoch"] < cfg.epochs else None
    mosaics.hard = None if st["hard"] is None else np.asarray(st["hard"])
    mosaics.hard_share = cfg.hard_share if st["hard"] is not None else 0.0
    t0 = time.perf_counter() - st["seconds"]
    while st["epoch"] < cfg.epochs:
        if _phase_done(st, cfg):
            if st["phase"] >= cfg.rounds:
                break
            _mine(ema.model, train, mosaics, st, cfg, progress)
        te = time.perf_counter()
        st["epoch"] += 1
        lr = cfg.lr * 0.5 ** st["phase"]
        loss = _train_epoch(model, ema, opt, train, mosaics, cfg, st, lr, teacher)
        sel = _select_metrics(ema.model, select, cfg)
        best = sel["score"] > st["best_score"]
        row = {"epoch": st["epoch"], "phase": st["phase"], "train_loss": loss, **{k: sel[k] for k in LOG_COLUMNS
               if k in sel}, "lr": lr, "seconds": round(time.perf_counter() - te, 1), "best": best,
               "view_gap": st.pop("view_gap", math.nan)}
        st["log"].append(row)
        if best:
            st["best_score"], st["best_epoch"] = sel["score"], st["epoch"]
            save_model(ema.model, work / "best.pt", {**model.metadata, "dense_best_epoch": st["epoch"]})
        st["seconds"] = time.perf_counter() - t0
        _save_checkpoint(ckpt_path, model, ema, opt, st, run_config)
        _write_log(work / "dense.log.csv", st["log"])
        gap = "" if math.isnan(row["view_gap"]) else f", view gap {row['view_gap']:.4f}"
        _say(progress, f"dense epoch {st['epoch']} (phase {st['phase']}): loss {loss:.4f}{gap} " + _fmt(sel)
             + f" {row['seconds']:.0f}s" + (" *" if best else ""))
    _close_phase(st)
    return _finish(work / "best.pt", out, train, select, holdout, cfg, st, str(init), progress)


# ------------------------------------------------------------------------------------------------ the steps
def _train_epoch(model, ema, opt, train, mosaics, cfg: DenseConfig, st: dict, lr: float,
                 teacher: np.ndarray | None = None) -> float:
    from wsi_vssm.training.data.dense_mosaics import patch_token_targets

    model.train()
    rng = np.random.default_rng([cfg.seed, st["epoch"], 11])
    g = torch.Generator().manual_seed(cfg.seed * 1000 + st["epoch"])
    labels = np.asarray(train.labels)
    idx = _epoch_draw(labels, cfg.epoch_patches, rng, mosaics)
    colour = AugmentConfig(**{**cfg.augment.to_dict(), "flip_rot": False})  # mosaics: labels must stay put
    dev = next(model.parameters()).device
    prec = resolve_precision(cfg.precision, dev)
    losses, gaps = [], []
    for s in range(0, len(idx) - cfg.batch_size + 1, cfg.batch_size):
        st["step"] += 1
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, st["step"] / cfg.warmup_steps)
        batch = idx[s:s + cfg.batch_size]
        xp = torch.from_numpy(np.stack([train[int(i)][0] for i in batch])).permute(0, 3, 1, 2)
        tp, wp = patch_token_targets(labels[batch], mosaics.weights)
        xm, tm, wm = mosaics.batch(rng, cfg.mosaic_cells)
        with autocast(prec, dev):  # the augmentation's blur too, as before the consistency term
            xp = normalise(augment_batch(xp, cfg.augment, g).to(dev))
            xm = normalise(augment_batch(torch.from_numpy(xm), colour, g).to(dev))
            lp, lm = model.cell_logits(xp).float(), model.cell_logits(xm).float()
        target = torch.from_numpy(np.concatenate([tp.reshape(-1), tm.reshape(-1)])).to(dev)
        weight = torch.from_numpy(np.concatenate([wp.reshape(-1), wm.reshape(-1)])).to(dev)
        logits = torch.cat([lp.reshape(-1), lm.reshape(-1)])
        loss = balanced_bce(logits, target, weight)
        if cfg.consistency:
            turn, flip = SYMMETRIES[int(rng.integers(len(SYMMETRIES)))]
            with autocast(prec, dev):
                views = [unturn(model.cell_logits(turned(x, turn, flip)), turn, flip).float() for x in (xp, xm)]
            other = torch.cat([v.reshape(-1) for v in views])
            gap = (logits - other).square().mean()
            loss = 0.5 * (loss + balanced_bce(other, target, weight)) + cfg.consistency * gap
            gaps.append(float(gap.detach()))
        if teacher is not None:  # the unturned view's centre tokens, at the full weight whether or not turned too
            soft = torch.from_numpy(teacher[batch]).to(dev)
            loss = loss + cfg.distill * F.binary_cross_entropy_with_logits(lp[:, 1, 1], soft)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
        losses.append(float(loss.detach()))
    st["view_gap"] = float(np.mean(gaps)) if gaps else math.nan
    return float(np.mean(losses)) if losses else math.nan


def _teacher(init, cfg: DenseConfig, train, work: Path, progress: bool) -> np.ndarray:
    """The soft targets of `distill`: the start model's (`init`) 8-view TTA centre-token probability of every
    training patch. Kept beside the checkpoint under a key of the start's weights and the training patches' bytes,
    so a resumed run reads the same targets and another start or other data computes its own."""
    import hashlib
    import io

    from wsi_vssm.atomic import atomic_write_bytes
    from wsi_vssm.models.model_file import state_dict_hash
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.outputs.report import roc_auc_or_nan
    from wsi_vssm.training.data.fingerprints import patch_digests
    from wsi_vssm.training.patch_eval import predict_patches

    start = load_model(init, scan=cfg.scan)
    key = f"{state_dict_hash(start.state_dict())} {hashlib.sha256(patch_digests(train).tobytes()).hexdigest()}"
    path = work / "teacher_tta.npz"
    try:
        with np.load(path) as kept:
            if str(kept["key"]) == key and kept["probs"].shape == (len(train),):
                return kept["probs"].astype(np.float32)
    except (OSError, ValueError, KeyError):  # none yet, or not readable: computed again
        pass
    t = time.perf_counter()
    probs = predict_patches(start, train, tta=True).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, probs=probs, key=np.array(key))
    atomic_write_bytes(path, buf.getvalue())
    _say(progress, f"dense: soft targets: the start's 8-view TTA on {len(train)} training patches (train AUC "
                   f"{roc_auc_or_nan(np.asarray(train.labels), probs):.4f}, {time.perf_counter() - t:.0f} s)")
    return probs


# the seven symmetries of the square other than the identity: (quarter turns, flipped left-right first)
SYMMETRIES = [(t, f) for f in (False, True) for t in range(4) if t or f]


def turned(x: torch.Tensor, turn: int, flip: bool) -> torch.Tensor:
    """(..., H, W) flipped left-right (when `flip`), then turned `turn` quarter turns."""
    return torch.rot90(x.flip(-1) if flip else x, turn, (-2, -1)).contiguous()


def unturn(x: torch.Tensor, turn: int, flip: bool) -> torch.Tensor:
    """The inverse of `turned`: a map computed on a turned input, back in the input's orientation."""
    x = torch.rot90(x, -turn, (-2, -1))
    return x.flip(-1) if flip else x


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted BCE in which positive and negative tokens each carry half of the loss."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight
    pos = target > 0.5
    parts = [bce[m].sum() / weight[m].sum() for m in (pos, ~pos) if weight[m].sum() > 0]
    return sum(parts) / len(parts)


def _epoch_draw(labels: np.ndarray, n: int, rng: np.random.Generator, mosaics) -> np.ndarray:
    """`n` isolated patches, half of each class; with a mined pool, `hard_share` of the negatives from it."""
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    half = n // 2
    picks = [rng.choice(pos, half), rng.choice(neg, n - half)]
    if mosaics.hard is not None and mosaics.hard_share > 0:
        k = int(round(mosaics.hard_share * (n - half)))
        picks[1][:k] = rng.choice(mosaics.hard, k)
    return rng.permutation(np.concatenate(picks))


def _select_metrics(model, select, cfg: DenseConfig) -> dict:
    from wsi_vssm.training.dense_eval import mosaic_token_logits, split_tokens, token_metrics
    from wsi_vssm.training.patch_eval import evaluate

    iso = evaluate(model, select)
    order, logits = mosaic_token_logits(model, select, cfg.eval_grid, cfg.seed)
    # sensitivity at 99.5% whatever `token_specificity` is: one fixed figure across runs (bench/detector.py's)
    m = token_metrics(split_tokens(np.asarray(select.labels)[order], logits), 0.995)
    return {"iso_auc": iso["auc"], **m, "score": 0.5 * (iso["auc"] + m["dense_auc"])}


def _fmt(m: dict) -> str:
    return (f"select: patch AUC {m['iso_auc']:.4f}, in mosaics centre AUC {m['centre_auc']:.4f} dense AUC "
            f"{m['dense_auc']:.4f}, sensitivity at 99.5% token specificity "
            f"{m.get('sensitivity_at_0.995', math.nan):.3f}, rim noise {m['rim_noise']:.4f}; score {m['score']:.4f}")


# ------------------------------------------------------------------------------------------------ phases
def _fresh_state() -> dict:
    return {"epoch": 0, "phase": 0, "phase_start": 0, "step": 0, "best_score": -1.0, "best_epoch": 0, "log": [],
            "hard": None, "phases": [], "mining": [], "seconds": 0.0, "start": None}


def _phase_done(st: dict, cfg: DenseConfig) -> bool:
    scores = [r["score"] for r in st["log"] if r["phase"] == st["phase"]]
    if len(scores) >= cfg.round_epochs:
        return True
    if len(scores) <= cfg.plateau:
        return False
    return max(scores[-cfg.plateau:]) < max(scores[:-cfg.plateau]) + cfg.min_gain


def _close_phase(st: dict) -> None:
    rows = [r for r in st["log"] if r["phase"] == st["phase"]]
    if rows and not any(p["phase"] == st["phase"] for p in st["phases"]):
        best = max(rows, key=lambda r: r["score"])
        st["phases"].append({"phase": st["phase"], "epochs": len(rows), "best_epoch": best["epoch"],
                             "best_score": best["score"], "dense_auc": best["dense_auc"],
                             "sensitivity_at_0.995": best["sensitivity_at_0.995"]})


def _mine(model, train, mosaics, st: dict, cfg: DenseConfig, progress: bool) -> None:
    from wsi_vssm.training.dense_eval import mine_hard_negatives

    _close_phase(st)
    t = time.perf_counter()
    hard, info = mine_hard_negatives(model, train, cfg.eval_grid, cfg.hard_top, cfg.seed + st["phase"])
    info.update(before_phase=st["phase"] + 1, seconds=round(time.perf_counter() - t, 1))
    st["mining"].append(info)
    st["hard"], st["phase"], st["phase_start"] = hard.tolist(), st["phase"] + 1, st["epoch"]
    mosaics.hard, mosaics.hard_share = hard, cfg.hard_share
    _say(progress, f"dense: mining round {st['phase']}: {info['scored']} training negatives scored in context, "
                   f"{100 * info['share_any_token_above_0.5']:.1f}% with a token above 0.5; pool of the worst "
                   f"{info['pool']} ({info['seconds']:.0f} s)")


# ------------------------------------------------------------------------------------------------ checkpoint
RESUME_MAY_CHANGE = ("epochs", "rounds", "round_epochs", "plateau", "resume", "device")  # the rest must match


def _save_checkpoint(path: Path, model, ema, opt, st: dict, config: dict) -> None:
    save_checkpoint(path, {"model": model.state_dict(), "ema": ema.model.state_dict(), "ema_updates": ema.updates,
                           "opt": opt.state_dict(), "state": st}, config)


def _load_checkpoint(path: Path, model, ema, opt, config: dict) -> dict:
    ck = load_checkpoint(path, config, RESUME_MAY_CHANGE)
    model.load_state_dict(ck["model"])
    ema.model.load_state_dict(ck["ema"])
    ema.updates = ck["ema_updates"]
    opt.load_state_dict(ck["opt"])
    for row in ck["state"].get("log", []):  # rows of checkpoints from before the column: written as empty
        row.setdefault("view_gap", math.nan)
    return ck["state"]


def _write_log(path: Path, rows: list[dict]) -> None:
    from wsi_vssm.atomic import atomic_write_rows

    atomic_write_rows(path, rows, LOG_COLUMNS)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ the end
def _finish(best_path: Path, out: Path, train, select, holdout, cfg: DenseConfig, st: dict, init: str,
            progress: bool) -> dict:
    """Calibrate the best epoch's cell head on the selection part, set the cell threshold, score the held-back
    part once, and write the model file (with the patches that trained and selected it)."""
    from wsi_vssm.models.slide_model import load_model, save_model
    from wsi_vssm.outputs.calibration import expected_calibration_error
    from wsi_vssm.pipeline.predict import patch_probabilities
    from wsi_vssm.training.data.fingerprints import KEY, patch_record
    from wsi_vssm.training.dense_eval import (
        fit_platt,
        fold_platt,
        mosaic_token_logits,
        split_tokens,
    )
    from wsi_vssm.training.patch_eval import predict_patches

    if not best_path.exists():
        raise UsageError(f"dense: no epoch was trained ({best_path} missing)")
    model = load_model(best_path, scan=cfg.scan)
    order, logits = mosaic_token_logits(model, select, cfg.eval_grid, cfg.seed)
    labels = np.asarray(select.labels)[order]
    a, b = fit_platt(logits[:, 1, 1], labels)
    fold_platt(model.mil.cell_head, a, b)
    tok = split_tokens(labels, a * logits + b)
    normal = np.concatenate([tok["neg_centre"], tok["neg_rim"]])
    threshold = float(1 / (1 + np.exp(-np.quantile(normal, cfg.token_specificity))))
    record = {"method": "dense token supervision + hard-negative mining (wsi_vssm.training.dense)", "init": init,
              "config": cfg.to_dict(), "epochs_run": st["epoch"], "best_epoch": st["best_epoch"],
              "phases": st["phases"], "mining": st["mining"], "start_select": st["start"], "log": st["log"],
              "platt": {"a": a, "b": b, "fitted_on": "selection part, in-mosaic centre tokens"},
              "cell_threshold": threshold, "token_specificity": cfg.token_specificity,
              "seconds": round(st["seconds"], 1)}
    model.name = "dense"
    # a patch scored alone (`evaluate PATCHES`) has no context: its centre token's logits sit on another scale
    iso = np.clip(predict_patches(model, select), 1e-7, 1 - 1e-7)
    pa, pb = fit_platt(np.log(iso / (1 - iso)), np.asarray(select.labels))
    record["patch_platt"] = {"a": pa, "b": pb, "fitted_on": "selection part, isolated patches (centre token)"}
    meta = {**model.metadata, "stage": "dense", "dense_stage": record, "cell_threshold": threshold,
            "cell_calibration": "platt", "patch_calibration": {"a": pa, "b": pb},
            KEY: patch_record(train, select, model.metadata.get(KEY))}
    meta.pop("dense_best_epoch", None)
    if holdout is not None and len(holdout):
        p = patch_probabilities(predict_patches(model, holdout), meta)
        y = np.asarray(holdout.labels)
        hold = _select_metrics(model, holdout, cfg)
        hold.update(n=len(holdout), ece=expected_calibration_error(y, p),
                    balanced_accuracy_at_cell_threshold=0.5 * (float((p[y == 1] >= threshold).mean())
                                                               + float((p[y == 0] < threshold).mean())))
        record["holdout"] = hold
        _say(progress, f"dense: held-back part (n={len(holdout)}, never used to choose): " + _fmt(hold)
             + f"; cell ECE {hold['ece']:.4f}; balanced accuracy at the cell threshold "
               f"{hold['balanced_accuracy_at_cell_threshold']:.4f}")
    save_model(model, out, stamped(meta))
    _say(progress, f"dense: best epoch {st['best_epoch']} of {st['epoch']}; Platt a={a:.3f} b={b:.3f}; cell "
                   f"threshold {threshold:.4f} ({100 * cfg.token_specificity:g}% of selection normal tokens below)"
                   f" -> {out}")
    return record
