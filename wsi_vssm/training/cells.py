"""Stage 1 of training: the backbone and the cell head on cell labels.

Sources: labelled 96 x 96 patches (PCam / ImageFolder; the label is the centre 32 px = the centre stride-32 token
of the 3 x 3 token map) and, optionally, region crops of annotated slides (a label per token). The loss
(BCE-with-logits) is computed here, never in the model. AdamW, linear warmup then cosine decay, seeded. After every
epoch the model is scored on the validation "select" split; the best AUC is kept (the validation data only
selects, it never trains) and training stops early after `patience` epochs without improvement. A held-back part
of the validation data, never used to select, is scored once at the end, alone and tiled into mosaics (in
context, as on slides). The MIL head is then initialised on bags of *training* patches' centre-token features
(see `fit_mil_on_patch_bags`), so the file is a whole slide model. Options: `ema` validates and saves a moving
average of the weights; `mosaic_grid` adds mosaic crops of training patches to every step (the model meets
slide-sized token maps) and selects on the mean of the isolated and in-mosaic AUC; `init` fine-tunes a model file.

Under `torchrun --nproc_per_node N -m wsi_vssm train cells ...` the backbone and cell head train data-parallel
(DistributedDataParallel, wsi_vssm/training/ddp.py): each process takes every N-th patch of the epoch's seeded draw,
so the effective batch is N x `batch_size`; rank 0 alone validates, decides, logs and writes the model.

    python -m wsi_vssm.training.cells --evaluate MODEL.pt --valid valid.tar   # prints AUC / accuracy
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from wsi_vssm.errors import UsageError
from wsi_vssm.models.device import resolve_device
from wsi_vssm.models.inputs import IMAGE_MEAN, IMAGE_STD
from wsi_vssm.models.inputs import normalise_batch as normalise
from wsi_vssm.models.precision import autocast, check_precision, resolve_precision
from wsi_vssm.models.registry import get_config
from wsi_vssm.models.slide_model import SlideModel, load_model, save_model
from wsi_vssm.training.checkpoint import load_checkpoint, refuse_unless_resuming, save_checkpoint, stamped
from wsi_vssm.training.config_checks import check_cells_config
from wsi_vssm.training.data.augment import AugmentConfig, augment_batch
from wsi_vssm.training.data.fingerprints import KEY as PATCHES_KEY
from wsi_vssm.training.data.fingerprints import patch_record
from wsi_vssm.training.data.patches import (
    PatchDataset,
    check_training_sets,
    collate_uint8,
    select_and_holdout,
    training_patches,
)
from wsi_vssm.training.ddp import (
    DistContext,
    all_reduce_mean,
    barrier,
    broadcast_object,
    depthwise_channels_last,
    dist_meta,
    session,
    shard,
)
from wsi_vssm.training.optim import WeightAverage, adamw  # WeightAverage: also imported from here
from wsi_vssm.training.patch_eval import device_of, evaluate, evaluate_in_mosaics, progress_bar
from wsi_vssm.training.patch_mil import fit_mil_on_patch_bags

CONTEXT_GRID = 8  # mosaics of 8 x 8 patches (768 px) for the in-context held-back figure when training used none
LOG_COLUMNS = ("epoch", "train_loss", "valid_loss", "valid_auc", "valid_acc", "valid_mosaic_auc", "lr", "seconds",
               "best")


@dataclass
class TrainCellsConfig:
    arch: str = "micro"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05  # share of all steps spent in the linear warmup
    seed: int = 0
    max_train: int | None = None  # a seeded class-stratified subset of the training patches
    epoch_size: int | None = None  # patches per epoch (a fresh seeded draw each epoch); None = all
    valid_select: int | None = None  # validation patches used to select (stratified); rest held back; None = half
    patience: int = 3
    min_epochs: int = 0  # no early stop before this epoch: the peak lr can hold the score under an early best for
    #                      several epochs (r9's context stage: epochs 3-7 under epoch 2, epoch 8 a new best)
    scan: str = "auto"
    mpp: float = 0.97  # the patches' resolution, stamped in the model: predict reads slides at it
    domain: str | None = None  # one line on what the patches show (model metadata `domain`; None: the default's)
    token_px: int = 32
    mil_bags: int = 400  # bags of training patches for the MIL head (0: leave it untrained)
    mil_bag_size: int = 16
    mil_patches: int = 2000  # training patches whose features build those bags
    mil_steps: int = 300  # Adam steps (32 bags each) for the MIL head
    region_batch: int = 4  # region crops per step when slides are given
    region_crop_px: int = 512  # side of a region crop at `mpp`
    device: str = "cpu"  # cpu, cuda or auto; under torchrun each process takes GPU LOCAL_RANK
    init: str | None = None  # start from this model file's weights (backbone and heads) instead of random ones
    mosaic_grid: int = 0  # > 0: also train on mosaics of grid x grid training patches (region_batch per step),
    #                       and select on the mean of the isolated and the in-mosaic validation AUC
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off); the average is what
    #                   is validated, selected and saved (it smooths the last epochs' noisy steps)
    drop_path: float | None = None  # stochastic depth while training (None: the architecture's own rate)
    precision: str = "fp32"  # fp32 | bf16 | auto: bf16 autocast of the forward where the hardware has it
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    resume: bool = False  # continue from the per-epoch checkpoint an interrupted run left (training.checkpoint)

    def __post_init__(self):
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        check_cells_config(self)
        if self.mosaic_grid and int(self.mosaic_grid) < 2:
            raise UsageError(f"mosaic_grid must be 0 (off) or >= 2, got {self.mosaic_grid!r}")
        check_precision(self.precision)

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup to `base`, then cosine decay to 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _epoch_indices(n: int, size: int | None, epoch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    return perm if size is None or size >= n else perm[:size]


class _CellNet(nn.Module):
    """What cell training runs of a SlideModel: the backbone and the cell head (the MIL attention layers are not
    trained here, and DDP refuses parameters that get no gradient). One forward takes the patch batch and the
    optional region batch, so DDP sees one forward per step. Returns ((B, h, w) patch logits, region logits)."""

    def __init__(self, model: SlideModel):
        super().__init__()
        self.backbone, self.cell_head = model.backbone, model.mil.cell_head  # the same parameters, registered here
        self._model = (model,)  # not a submodule: its other parameters stay outside DDP

    def forward(self, x: torch.Tensor, regions: torch.Tensor | None = None):
        model = self._model[0]
        return model.cell_logits(x), None if regions is None else model.cell_logits(regions)


def _step_loss(net: nn.Module, x, y, region_batch, cfg: TrainCellsConfig, g: torch.Generator, dev) -> torch.Tensor:
    """BCE of the centre token of each patch, plus (with region crops) BCE over every token with tissue of each
    crop (labels: lesion fraction > 0.5). Augmentation runs on the CPU with the seeded generator `g`."""
    xp = normalise(augment_batch(x, cfg.augment, g).to(dev))  # (B, 3, 96, 96)
    xr = None
    if region_batch is not None:
        xr, labels, mask = region_batch  # (R, 3, S, S) uint8, (R, h, w), (R, h, w) bool
        xr = normalise(augment_batch(xr, _no_geometry(cfg.augment), g).to(dev))  # flips would misalign labels
    logits, region_logits = net(xp, xr)  # (B, h, w), (R, h, w) or None
    loss = F.binary_cross_entropy_with_logits(logits[:, logits.shape[1] // 2, logits.shape[2] // 2], y.to(dev))
    if region_logits is not None:
        mask = mask.to(dev)
        if mask.any():
            loss = loss + F.binary_cross_entropy_with_logits(region_logits[mask], labels.to(dev)[mask])
        else:
            loss = loss + region_logits.sum() * 0.0
    return loss


def _no_geometry(aug: AugmentConfig) -> AugmentConfig:
    return AugmentConfig(**{**aug.to_dict(), "flip_rot": False})


_RANK_SEED = 1_000_003  # per-rank offset of the augmentation seed (rank 0: the single-process seed)


def _epoch_shard(n: int, cfg: TrainCellsConfig, epoch: int, ctx: DistContext) -> np.ndarray:
    """This process's patches for `epoch`: the seeded draw, sharded over the ranks (all of it alone)."""
    return shard(_epoch_indices(n, cfg.epoch_size, epoch, cfg.seed), ctx.rank, ctx.world_size)


def _train_epoch(model, net, opt, train: PatchDataset, regions, cfg, epoch: int, step0: int, total: int,
                 progress: bool, ctx: DistContext, ema: WeightAverage | None = None) -> tuple[float, int]:
    """One epoch; returns (training loss averaged over steps and ranks, next step)."""
    model.train()
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + _RANK_SEED * ctx.rank)
    idx = _epoch_shard(len(train), cfg, epoch, ctx)
    loader = DataLoader(train.subset(idx), batch_size=cfg.batch_size, shuffle=False,
                        drop_last=len(idx) > cfg.batch_size, collate_fn=collate_uint8, num_workers=0)
    region_iter = _region_batches(regions, cfg, epoch, ctx) if regions is not None else None
    warmup = max(1, int(cfg.warmup_frac * total))
    dev = device_of(model)
    losses, step = [], step0
    for x, y in progress_bar(loader, progress, f"epoch {epoch}"):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cfg.lr, warmup)
        with autocast(resolve_precision(cfg.precision, dev), dev):  # master weights and the optimiser stay fp32
            loss = _step_loss(net, x, y, next(region_iter) if region_iter is not None else None, cfg, g, dev)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # under DDP: gradients averaged over the ranks here
        opt.step()
        if ema is not None:
            ema.update(model)
        losses.append(float(loss.detach()))
        step += 1
    mean = float(np.mean(losses)) if losses else float("nan")
    return float(all_reduce_mean(torch.tensor(mean, dtype=torch.float64, device=dev))), step


def _region_batches(regions, cfg: TrainCellsConfig, epoch: int, ctx: DistContext | None = None):
    """Endless shuffled batches of region crops (one pass per shuffle, seeded per epoch; each rank its shard)."""
    from wsi_vssm.training.data.region_crops import collate_regions

    ctx = ctx or DistContext()
    k = 0
    while True:
        order = shard(np.random.default_rng([cfg.seed, epoch, k]).permutation(len(regions)), ctx.rank,
                      ctx.world_size)
        for i in range(0, len(order), cfg.region_batch):
            yield collate_regions([regions[int(j)] for j in order[i:i + cfg.region_batch]])
        k += 1


def _write_log(path: Path, rows: list[dict]) -> None:
    """The per-epoch log, rewritten atomically after every epoch: JSON for a .json path, else CSV."""
    from wsi_vssm.atomic import atomic_write_rows

    atomic_write_rows(path, rows, LOG_COLUMNS)


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    model: SlideModel  # the selected (best valid AUC) model
    log: list[dict]
    best_epoch: int
    select: dict  # metrics on the selection split at the best epoch
    holdout: dict | None  # metrics on the held-back validation part (never used to select)
    seconds: float


def train_cells(train_src, valid_src, out: str | os.PathLike, cfg: TrainCellsConfig | None = None,
                slides: str | os.PathLike | None = None, progress: bool = True,
                log_path: str | os.PathLike | None = None,
                checkpoint_path: str | os.PathLike | None = None) -> TrainResult:
    """Train on `train_src`, select on part of `valid_src`, write the best model to `out` and a CSV log beside it.

    After every epoch the training state goes to `checkpoint_path` (default: OUT.checkpoint.pt beside `out`),
    which a finished run removes; `cfg.resume` continues from it (the same settings but `epochs` and
    `patience`), and a run that finds one without `cfg.resume` stops with one line.

    `train_src`/`valid_src`: folders or tars in ImageFolder layout (or PatchDatasets). `slides`: a folder of
    slides with lesion annotations, used as an extra source of region crops.

    Under torchrun (WORLD_SIZE > 1) this joins the process group (or uses the caller's) and trains with DDP;
    only rank 0 writes files and shows progress. Other ranks return the last epoch's model, the same log and
    selection metrics, and `holdout=None`.
    """
    cfg = cfg or TrainCellsConfig()
    with session(resolve_device(cfg.device)) as ctx:
        ckpt = Path(checkpoint_path) if checkpoint_path else Path(out).with_suffix(".checkpoint.pt")
        return _train_cells(train_src, valid_src, Path(out), cfg, slides, progress and ctx.is_main, log_path, ctx,
                            ckpt)


RESUME_MAY_CHANGE = ("epochs", "patience", "min_epochs", "resume", "device", "domain")  # the rest: as the checkpoint


def _train_cells(train_src, valid_src, out: Path, cfg: TrainCellsConfig, slides, progress: bool, log_path,
                 ctx: DistContext, ckpt_path: Path) -> TrainResult:
    refuse_unless_resuming(ckpt_path, cfg.resume, "--resume")  # before any data is read
    torch.manual_seed(cfg.seed)  # the same initial model on every rank (DDP also broadcasts rank 0's)
    np.random.seed(cfg.seed % 2**32)
    train = training_patches(train_src, cfg.max_train, cfg.seed)
    valid = training_patches(valid_src)
    select, holdout = split_valid(valid, cfg)
    check_training_sets(train, select, holdout, cfg.epoch_size, cfg.mosaic_grid and (int(cfg.mosaic_grid), cfg.seed))
    if slides and cfg.mosaic_grid:
        raise UsageError("give annotated slides or mosaic_grid, not both")
    regions = _load_regions(slides, cfg) if slides else _mosaic_regions(train, cfg)
    model = _initial_model(cfg)
    model.to(ctx.device)
    if ctx.enabled:
        depthwise_channels_last(model)
    ema = WeightAverage(model, cfg.ema) if cfg.ema > 0 else None
    chosen = ema.model if ema is not None else model  # what is validated, selected and saved
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    per_epoch = len(_epoch_shard(len(train), cfg, 0, ctx)) // cfg.batch_size or 1
    total = per_epoch * cfg.epochs
    log_path = Path(log_path) if log_path else out.with_suffix(".log.csv")

    seen = {PATCHES_KEY: patch_record(train, select, getattr(model, "metadata", {}).get(PATCHES_KEY))}

    def meta(log, best_epoch, sel, hold) -> dict:
        return {**_metadata(cfg, train, select, holdout, log, best_epoch, sel, hold, slides),
                **dist_meta(cfg.batch_size, ctx), **seen}

    # the patch counts too: a resume on a folder that lost or gained patches was taken (paths absolute: the same
    # folder given another way is the same data)
    run_config = {**cfg.to_dict(), "train": os.path.abspath(train.source), "valid": os.path.abspath(valid.source),
                  "patches": [len(train), int(train.labels.sum()), len(valid), int(valid.labels.sum())],
                  "slides": None if slides is None else str(slides), "world_size": ctx.world_size}
    from wsi_vssm.training.checkpoint import with_start_digests

    run_config = with_start_digests(run_config, output=out)  # the start model by its contents
    log, best, best_epoch, best_sel, step, t0 = [], -1.0, 0, {}, 0, time.perf_counter()
    first, stopped = 1, False
    if cfg.resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, run_config, RESUME_MAY_CHANGE)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        if ema is not None:
            ema.model.load_state_dict(ck["ema"])
            ema.updates = ck["ema_updates"]
        log, best, best_epoch, best_sel, step = ck["log"], ck["best"], ck["best_epoch"], ck["best_sel"], ck["step"]
        first, t0 = ck["epoch"] + 1, t0 - ck["seconds"]
        # stopped by the rule as it reads now: --patience and --min-epochs may change on resume
        stopped = bool(log) and _stops(cfg, ck["epoch"], best_epoch, log[-1]["best"])
        if regions is not None and hasattr(regions, "calls"):
            regions.calls = ck["region_calls"]  # mosaic crops draw from a counter: the uninterrupted run's mosaics
        if best_epoch and ctx.is_main and not out.is_file():  # found now, not after the remaining epochs
            raise UsageError(f"{out} is missing: it holds the best epoch so far ({best_epoch}) of the run "
                             f"{ckpt_path} continues; put it back, or remove {ckpt_path} to start over")
        _say(progress, f"resumed from {ckpt_path} after epoch {ck['epoch']} (best so far: epoch {best_epoch})")
    elif cfg.resume:
        _say(progress, f"no checkpoint {ckpt_path} to resume from: starting from the first epoch")
    net = _wrap(model, ctx)

    def checkpoint(epoch: int, stop: bool) -> None:
        if ctx.is_main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "opt": opt.state_dict(), "ema": None if ema is None else
                ema.model.state_dict(), "ema_updates": 0 if ema is None else ema.updates,
                "log": log, "best": best, "best_epoch": best_epoch, "best_sel": best_sel, "step": step,
                "epoch": epoch, "stopped": stop, "seconds": time.perf_counter() - t0,
                "region_calls": getattr(regions, "calls", None)}, run_config)

    for epoch in range(first, cfg.epochs + 1):
        if stopped:
            break
        te = time.perf_counter()
        train_loss, step = _train_epoch(model, net, opt, train, regions, cfg, epoch, step, total, progress, ctx,
                                        ema)
        row, sel = None, None
        if ctx.is_main:  # validation, the decision and the files: rank 0 alone; the others wait for its row
            sel = _select_metrics(chosen, select, cfg, progress)
            improved = sel["score"] > best or (sel["score"] == best and sel["loss"] < best_sel.get("loss", math.inf))
            row = dict(epoch=epoch, train_loss=train_loss, valid_loss=sel["loss"], valid_auc=sel["auc"],
                       valid_acc=sel["accuracy"], valid_mosaic_auc=sel.get("mosaic_auc", math.nan),
                       lr=opt.param_groups[0]["lr"], seconds=time.perf_counter() - te, best=improved)
            _write_log(log_path, log + [row])
            ctx_auc = f" in-mosaic AUC {sel['mosaic_auc']:.4f}" if "mosaic_auc" in sel else ""
            _say(progress, f"epoch {epoch}: train loss {train_loss:.4f}  valid(select) loss {sel['loss']:.4f} "
                           f"AUC {sel['auc']:.4f} acc {sel['accuracy']:.4f}{ctx_auc}  {row['seconds']:.0f}s")
        row, sel = broadcast_object((row, sel))
        log.append(row)
        if row["best"]:
            best, best_epoch, best_sel = sel["score"], epoch, sel
            if ctx.is_main:  # marked unfinished until the end (`predict --model` warns about such a file)
                save_model(chosen, out, {**meta(log, best_epoch, best_sel, None), "training_incomplete": True})
        stopped = _stops(cfg, epoch, best_epoch, row["best"])
        checkpoint(epoch, stopped)  # after the best model: a resume never needs an epoch the file lacks
        if stopped:
            _say(progress, f"early stop: no valid AUC gain for {epoch - best_epoch} epochs (patience "
                           f"{cfg.patience}, from epoch {cfg.min_epochs})")
    hold = None
    if ctx.is_main:
        model, hold, mil_info = finish_model(out, train, holdout, cfg, progress)
        m = meta(log, best_epoch, best_sel, hold)
        m.update(mil_stage=mil_info, train_seconds=round(time.perf_counter() - t0, 1))
        save_model(model, out, m)
        ckpt_path.unlink(missing_ok=True)  # finished: a rerun starts afresh
    barrier()  # all ranks leave together, after rank 0 has written the final model
    return TrainResult(model, log, best_epoch, best_sel, hold, time.perf_counter() - t0)


def _initial_model(cfg: TrainCellsConfig) -> SlideModel:
    """A fresh model of `cfg.arch`, or the weights of `cfg.init` (a model file) to continue from; with
    `cfg.drop_path` set, that stochastic-depth rate while training."""
    if not cfg.init:
        model = SlideModel.create(cfg.arch, mpp=cfg.mpp, token_px=cfg.token_px, scan=cfg.scan, name="cells")
    else:
        model = load_model(cfg.init, scan=cfg.scan)
        if abs(model.mpp - cfg.mpp) > 1e-6 or model.token_px != cfg.token_px:
            raise UsageError(f"{cfg.init}: made at {model.mpp} um/px with {model.token_px} px cells, "
                             f"the config asks for {cfg.mpp} and {cfg.token_px}")
        dims = tuple(model.backbone.config.dims)  # the file's backbone is trained: the metadata must name it
        if dims != tuple(get_config(cfg.arch).dims):
            raise UsageError(f"{cfg.init}: its backbone has stage widths {list(dims)}, not {cfg.arch}'s: give the "
                             "--model it was made with")
        model.name = "cells"
    if cfg.drop_path is not None:
        model.backbone.set_drop_path(float(cfg.drop_path))
    return model


def _mosaic_regions(train: PatchDataset, cfg: TrainCellsConfig):
    if not cfg.mosaic_grid:
        return None
    from wsi_vssm.training.data.mosaic_crops import MosaicCrops

    return MosaicCrops(train, int(cfg.mosaic_grid), cfg.seed)


def _stops(cfg: TrainCellsConfig, epoch: int, best_epoch: int, improved: bool) -> bool:
    """The early stop after `epoch`: `patience` epochs without a better selection score, not before `min_epochs`."""
    return not improved and epoch - best_epoch >= cfg.patience and epoch >= cfg.min_epochs


def _select_metrics(model: SlideModel, select: PatchDataset, cfg: TrainCellsConfig, progress: bool) -> dict:
    """Metrics on the selection split and the selection "score": its AUC, or with mosaic_grid the mean of the
    isolated and the in-mosaic AUC (the model serves both patches and slides)."""
    sel = evaluate(model, select, progress)
    sel["score"] = sel["auc"]
    if cfg.mosaic_grid:
        sel["mosaic_auc"] = evaluate_in_mosaics(model, select, int(cfg.mosaic_grid), cfg.seed)["auc"]
        sel["score"] = 0.5 * (sel["auc"] + sel["mosaic_auc"])
    return sel


def _wrap(model: SlideModel, ctx: DistContext) -> nn.Module:
    """The trained part of `model` (`_CellNet`), in DistributedDataParallel when several processes train."""
    net = _CellNet(model)
    if not ctx.enabled:
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.local_rank] if ctx.device.startswith("cuda") else None
    return DistributedDataParallel(net, device_ids=ids)


def finish_model(out, train: PatchDataset, holdout: PatchDataset | None, cfg: TrainCellsConfig,
                 progress: bool = False):
    """The selected checkpoint at `out`: scored once on the held-back validation part, then its MIL head fitted
    on training-patch bags. Returns (model, held-back metrics or None, MIL-stage info or None); writes nothing."""
    model = load_model(out, scan=cfg.scan)
    hold = evaluate(model, holdout, progress) if holdout is not None and len(holdout) else None
    if hold:
        grid = int(cfg.mosaic_grid) or CONTEXT_GRID
        ctx = evaluate_in_mosaics(model, holdout, grid, cfg.seed)
        hold.update(mosaic_grid=grid, mosaic_n=ctx["n"], mosaic_auc=ctx["auc"], mosaic_accuracy=ctx["accuracy"])
        in_mosaics = (f"in {grid} x {grid} mosaics (n={ctx['n']}): AUC {ctx['auc']:.4f} acc {ctx['accuracy']:.4f}"
                      if ctx["n"] else f"too few of them for one {grid} x {grid} mosaic (no in-context figure)")
        _say(progress, f"held-back valid (never used to select, n={hold['n']}): AUC {hold['auc']:.4f} acc "
                       f"{hold['accuracy']:.4f}; {in_mosaics}")
    mil_info = fit_mil_on_patch_bags(model, train, cfg, progress) if cfg.mil_bags > 0 else None
    model.name = "cells+mil" if mil_info else "cells"
    return model, hold, mil_info


def split_valid(valid: PatchDataset, cfg: TrainCellsConfig):
    """(selection, held-back or None) parts: `data.patches.select_and_holdout`, as mosaic cohorts split too."""
    return select_and_holdout(valid, cfg.valid_select, cfg.seed)


def _load_regions(slides, cfg: TrainCellsConfig):
    from wsi_vssm.training.data.region_crops import RegionCropDataset

    ds = RegionCropDataset.from_folder(slides, mpp=cfg.mpp, token_px=cfg.token_px, crop_px=cfg.region_crop_px,
                                       seed=cfg.seed)
    if len(ds) == 0:
        raise UsageError(f"{slides}: no region crops with tissue in the annotated slides")
    return ds


def _say(enabled: bool, msg: str) -> None:
    if enabled:
        from tqdm import tqdm

        tqdm.write(msg)


def _metadata(cfg, train, select, holdout, log, best_epoch, sel, hold, slides) -> dict:
    return {
        "stage": "cells",
        **({"domain": cfg.domain} if cfg.domain else {}),
        "train_data": {"source": train.source, "n": len(train), "positives": int(train.labels.sum())},
        "valid_select": {"source": select.source, "n": len(select)},
        "valid_holdout": None if holdout is None else {"source": holdout.source, "n": len(holdout)},
        "slides": None if slides is None else str(slides),
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "epochs_run": len(log),
        "best_epoch": best_epoch,
        "metrics": {"valid_select": sel, "valid_holdout": hold},
        "log": log,
        "normalisation": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD), "range": "RGB in [0, 1]"},
        "torch_version": torch.__version__,
        **stamped({}),  # date, package version, threads and machine
    }


def main(argv=None) -> int:
    """`python -m wsi_vssm.training.cells --evaluate MODEL --valid DIR`: see `training.patch_eval`."""
    from wsi_vssm.training.patch_eval import main as evaluate_main

    return evaluate_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
