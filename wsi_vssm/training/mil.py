"""Stage 3 of training: the AttentionMIL slide head on cached cell features, with slide labels.

One bag (slide) per step, Adam, bag-level BCE-with-logits computed here (the model never computes its loss),
seeded shuffling and initialisation, selection and early stopping on the validation split's AUC (ties broken by
validation loss). Never evaluate on what was trained on: `train_mil` refuses an empty or overlapping validation
set. The cell head is frozen by default (it was trained with the backbone on cell labels); with
`train_cell_head` it learns too, from a max-instance MIL loss on its cell logits.
"""

from __future__ import annotations

import io
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.report import roc_auc_or_nan  # the cohort report's AUC: training and reports agree
from wsi_vssm.training.mil_bags import FEATURE_KEYS, Bag, Bags, check_compatible  # noqa: F401  (re-exported)

MIL_FORMAT = "wsi-vssm-mil/1"
POOL_LAYERS = ("topk_affine.", "count_affine.")  # a pool's own slide map: never taken from another pool's head
COUNT_L2 = 1e-3
LOG_COLUMNS = ("epoch", "train_loss", "valid_loss", "valid_auc", "seconds", "best")


@dataclass
class MILTrainConfig:
    hidden_dim: int = 128
    attn_dim: int = 64
    dropout: float = 0.25
    epochs: int = 50
    lr: float = 2e-4
    weight_decay: float = 1e-4
    seed: int = 0
    patience: int = 10  # epochs without a better validation AUC before stopping
    train_cell_head: bool = False
    cell_loss_weight: float = 1.0  # only with train_cell_head
    max_cells: int | None = None  # at most this many random cells per training bag per step (None: all)
    cache_mb: float = 4096.0  # keep bags in memory up to this many MB of float16 features; beyond, re-read
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 | auto (the head is small: bf16 rarely pays here)
    pool: str = "attention"  # the slide logit: attention | topk | mix | count (models.mil)
    topk: int = 8
    count_threshold: float = 0.0  # count: the cell logit at and above which a cell counts (the cell threshold)

    def __post_init__(self):
        from wsi_vssm.models.precision import check_precision

        check_precision(self.precision)
        ints = {"hidden_dim": 1, "attn_dim": 1, "epochs": 1, "patience": 1}
        for name, low in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UsageError(f"{name} must be an integer >= {low}, got {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.cell_loss_weight >= 0):
            raise UsageError("lr must be > 0; weight_decay and cell_loss_weight >= 0")
        if self.max_cells is not None and (not isinstance(self.max_cells, int) or self.max_cells < 1):
            raise UsageError(f"max_cells must be a positive integer or None, got {self.max_cells!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainHistory:
    rows: list[dict] = field(default_factory=list)  # one per epoch, keys LOG_COLUMNS
    best_epoch: int = 0
    best_valid_auc: float = math.nan
    best_valid_loss: float = math.nan
    metadata: dict = field(default_factory=dict)


# ---- training ---------------------------------------------------------------------------------------------
def train_mil(
    train_stores: Sequence[Bag] | Bags,
    valid_stores: Sequence[Bag] | Bags,
    cfg: MILTrainConfig | None = None,
    cell_head: dict | None = None,
    log_path: str | os.PathLike | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    progress: Callable[[dict], None] | None = None,
    init_state: dict | None = None,
):
    """Train an AttentionMIL on (feature store, label) bags; returns (model with the best weights, TrainHistory).

    `init_state`: an AttentionMIL state dict of the same shape to start from (e.g. a model's current head);
    `cell_head`, when given too, replaces its cell head.
    `cell_head`: {"weight", "bias"} tensors of a trained cell head (frozen unless cfg.train_cell_head).
    `log_path`: a per-epoch CSV (or JSON, by extension) rewritten atomically after every epoch.
    `checkpoint_path`: the best model so far is saved there (atomically) whenever validation improves.
    `progress(row)` is called after each epoch with its log row.
    """
    import torch

    from wsi_vssm.models.mil import AttentionMIL, MILConfig

    cfg = cfg or MILTrainConfig()
    train = _without_cell_less(_bags(train_stores, cfg.cache_mb), "training")
    valid = _without_cell_less(_bags(valid_stores, cfg.cache_mb), "validation")
    _check_splits(train, valid)
    feature_attrs = check_compatible(train.stores + valid.stores)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    try:
        mil_cfg = MILConfig(int(feature_attrs["n_features"]), cfg.hidden_dim, cfg.attn_dim, cfg.dropout, cfg.pool,
                            cfg.topk, float(cfg.count_threshold))
    except ValueError as e:
        raise UsageError(str(e)) from e
    model = AttentionMIL(mil_cfg).to(cfg.device)
    if init_state is not None:
        try:  # a head of another pool starts its attention part from init_state and its own slide map fresh
            own = model.state_dict()
            model.load_state_dict({**{k: v for k, v in own.items() if k.startswith(POOL_LAYERS)},
                                   **{k: v for k, v in init_state.items() if not k.startswith(POOL_LAYERS)
                                      or k in own}}, strict=True)
        except RuntimeError as e:
            raise UsageError(f"init_state does not fit an AttentionMIL of {mil_cfg}: {str(e).splitlines()[0]}") from e
    _setup_cell_head(model, cell_head, cfg.train_cell_head)
    if cfg.pool == "count":
        return _fit_count_head(model, train, valid, cfg, feature_attrs, log_path, checkpoint_path, progress)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = TrainHistory(metadata=_metadata(cfg, train, valid, feature_attrs))
    best_state, stale = None, 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        train_loss = _train_epoch(model, opt, train, cfg, rng)
        valid_loss, valid_auc = evaluate(model, valid, cfg.device)
        better = _improves(valid_auc, valid_loss, history)
        values = (epoch, train_loss, valid_loss, valid_auc, time.perf_counter() - t0, better)
        row = dict(zip(LOG_COLUMNS, values, strict=True))
        history.rows.append(row)
        if better:
            history.best_epoch, history.best_valid_auc, history.best_valid_loss = epoch, valid_auc, valid_loss
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            stale = 0
            if checkpoint_path is not None:  # the best so far, marked: a run stopped here leaves an unfinished head
                save_mil(checkpoint_path, model, {**_final_metadata(history), "training_incomplete": True})
        else:
            stale += 1
        if log_path is not None:
            write_log(log_path, history.rows)
        if progress is not None:
            progress(row)
        if stale >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    history.metadata = _final_metadata(history)
    if checkpoint_path is not None and best_state is not None:  # the same weights, now as a finished run's
        save_mil(checkpoint_path, model, history.metadata)
    return model.eval(), history


def _fit_count_head(model, train: Bags, valid: Bags, cfg: MILTrainConfig, feature_attrs: dict, log_path,
                    checkpoint_path, progress):
    """The count head has three parameters and a convex loss: fit it exactly (L-BFGS logistic regression over
    the training bags, a light L2 on the two weights) instead of by epochs of SGD; one log row."""
    import torch
    import torch.nn.functional as F

    from wsi_vssm.models.mil import count_stats

    t0 = time.perf_counter()
    model.eval()
    x, y = [], []
    with torch.no_grad():
        for i in range(len(train)):  # every bag has cells (train_mil left out those without)
            f = torch.from_numpy(np.asarray(train.features(i), np.float32)).to(cfg.device)
            logits = model.cell_head(f).squeeze(-1)[None]
            x.append(count_stats(logits, None, model.config.count_threshold)[0].cpu())
            y.append(float(train.labels[i]))
    x, y = torch.stack(x).double(), torch.tensor(y, dtype=torch.float64)
    w = model.count_affine.weight.detach()[0].double().cpu().clone().requires_grad_(True)  # its initial map
    b = model.count_affine.bias.detach()[0].double().cpu().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def loss_fn():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + COUNT_L2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(loss_fn)
    with torch.no_grad():
        model.count_affine.weight.copy_(w.detach().float()[None].to(cfg.device))
        model.count_affine.bias.fill_(float(b))
        train_loss = float(F.binary_cross_entropy_with_logits(x @ w + b, y))
    valid_loss, valid_auc = evaluate(model, valid, cfg.device)
    history = TrainHistory(metadata=_metadata(cfg, train, valid, feature_attrs))
    row = dict(zip(LOG_COLUMNS, (1, train_loss, valid_loss, valid_auc, time.perf_counter() - t0, True), strict=True))
    history.rows.append(row)
    history.best_epoch, history.best_valid_auc, history.best_valid_loss = 1, valid_auc, valid_loss
    history.metadata = _final_metadata(history)
    if checkpoint_path is not None:
        save_mil(checkpoint_path, model, history.metadata)
    if log_path is not None:
        write_log(log_path, history.rows)
    if progress is not None:
        progress(row)
    return model.eval(), history


def _bags(stores, cache_mb: float) -> Bags:
    """`stores` as Bags: read already (an ensemble's members share them), or opened here."""
    return stores if isinstance(stores, Bags) else Bags(stores, cache_mb)


def _without_cell_less(bags: Bags, role: str) -> Bags:
    """`bags` less those without cells (a slide with no tissue found), with one warning naming them: such a bag
    has no slide logit (left in validation it would silently take a class out of the AUC), and in training it
    carries no evidence but would be counted among the slides the head was trained on."""
    empty = [s.name for s in bags.stores if len(s) == 0]
    if not empty:
        return bags
    shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
    warnings.warn(f"{len(empty)} {role} slide(s) have no cells (no tissue found) and are left out of "
                  f"{role}: {shown}", stacklevel=3)
    return bags.with_cells()


SMALL_VALID_CLASS = 10  # validation slides of a class under which selection is warned about, as evaluate does


def _check_splits(train: Bags, valid: Bags) -> None:
    if len(train) == 0:
        raise UsageError("no training slides (with cells)")
    if len(valid) == 0:
        raise UsageError("no validation slides (with cells): model selection needs a validation split apart from "
                         "training")
    both = sorted({s.path.resolve() for s in train.stores} & {s.path.resolve() for s in valid.stores})
    if both:
        raise UsageError(f"{len(both)} slide(s) are in both training and validation, e.g. {both[0]}")
    if len(set(train.labels)) < 2:
        warnings.warn("the training slides all have the same label; the model cannot learn to tell them apart",
                      stacklevel=3)
    n_tumour, n_normal = int(np.sum(np.asarray(valid.labels) == 1)), int(np.sum(np.asarray(valid.labels) == 0))
    if len(set(valid.labels)) < 2:
        warnings.warn("the validation slides all have one label: AUC is undefined, selecting on validation loss",
                      stacklevel=3)
    elif min(n_tumour, n_normal) < SMALL_VALID_CLASS:
        warnings.warn(f"selection rests on {n_tumour} tumour and {n_normal} normal validation slide(s): with fewer "
                      f"than {SMALL_VALID_CLASS} of a class the validation AUC jumps between few values (1.000 from "
                      "the first epoch is common), so the epoch chosen says little; give more validation slides",
                      stacklevel=3)


def _setup_cell_head(model, cell_head: dict | None, train_it: bool) -> None:
    if cell_head is not None:
        model.cell_head.load_state_dict(cell_head)
    elif not train_it:
        warnings.warn("no trained cell head given and --train-cell-head off: cell scores stay random", stacklevel=3)
    for p in model.cell_head.parameters():
        p.requires_grad_(train_it)


def _train_epoch(model, opt, bags: Bags, cfg: MILTrainConfig, rng: np.random.Generator) -> float:
    import torch
    import torch.nn.functional as F

    from wsi_vssm.models.precision import autocast, resolve_precision

    dtype = resolve_precision(cfg.precision, cfg.device)
    model.train()
    losses = []
    for i in rng.permutation(len(bags)):
        feats = bags.features(int(i))  # never empty: train_mil left out bags without cells
        if cfg.max_cells is not None and len(feats) > cfg.max_cells:
            feats = feats[np.sort(rng.choice(len(feats), cfg.max_cells, replace=False))]
        x = torch.from_numpy(np.asarray(feats, dtype=np.float32)).to(cfg.device)  # (N, F)
        y = torch.tensor([float(bags.labels[i])], device=cfg.device)  # (1,)
        with autocast(dtype, cfg.device):
            out = model(x)
        loss = F.binary_cross_entropy_with_logits(out.slide_logit.float(), y)
        if cfg.train_cell_head:
            # MIL instance loss: a tumour slide has at least one tumour cell, a normal slide none.
            top = out.cell_logits.float().max(dim=-1).values  # (1,)
            loss = loss + cfg.cell_loss_weight * F.binary_cross_entropy_with_logits(top, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else math.nan


def bag_logits(model, bags: Bags, device: str = "cpu") -> np.ndarray:
    """The slide logit of every bag (NaN for a bag without cells), in eval mode."""
    import torch

    model.eval()
    out = np.full(len(bags), np.nan)
    with torch.inference_mode():
        for i in range(len(bags)):
            feats = bags.features(i)
            if len(feats):
                out[i] = float(model(torch.from_numpy(np.asarray(feats, dtype=np.float32)).to(device)).slide_logit[0])
    return out


def evaluate(model, bags: Bags, device: str = "cpu") -> tuple[float, float]:
    """(mean bag BCE loss, AUC) of `model` on `bags`; slides without cells are skipped."""
    import torch
    import torch.nn.functional as F

    logits = bag_logits(model, bags, device)
    ok = np.isfinite(logits)
    if not ok.any():
        return math.nan, math.nan
    labels = np.asarray(bags.labels)[ok]
    t_logits = torch.tensor(logits[ok], dtype=torch.float32)
    loss = float(F.binary_cross_entropy_with_logits(t_logits, torch.tensor(labels, dtype=torch.float32)))
    return loss, roc_auc_or_nan(labels, logits[ok])


def _improves(auc: float, loss: float, h: TrainHistory) -> bool:
    """Higher validation AUC, or equal AUC (or none) with lower validation loss."""
    if h.best_epoch == 0:
        return not (math.isnan(loss) and math.isnan(auc))
    a, b = (-1.0 if math.isnan(auc) else auc), (-1.0 if math.isnan(h.best_valid_auc) else h.best_valid_auc)
    if a != b:
        return a > b
    return loss < h.best_valid_loss


def _metadata(cfg: MILTrainConfig, train: Bags, valid: Bags, feature_attrs: dict) -> dict:
    from wsi_vssm.training.checkpoint import stamped

    return {
        "seed": cfg.seed,
        "train_config": cfg.to_dict(),
        "train_slides": train.names(),
        "train_labels": list(train.labels),
        "valid_slides": valid.names(),
        "valid_labels": list(valid.labels),
        "features": feature_attrs,
        **stamped({}),  # date, package version, threads and machine
    }


def mil_provenance(path: str | os.PathLike) -> dict:
    """From a MIL checkpoint's metadata (`_metadata`), what a reader of a model it is attached to needs to rule
    out leakage: the slides that trained and selected the head, and where selection stopped; and the features'
    extract settings (`features`), which predict should match."""
    from wsi_vssm.models.checkpoint import read_checkpoint

    meta = read_checkpoint(path).get("metadata") or {}
    keys = ("train_slides", "valid_slides", "best_epoch", "epochs", "members", "valid_auc", "features")
    return {k: meta[k] for k in keys if k in meta}


def _final_metadata(h: TrainHistory) -> dict:
    return {
        **h.metadata,
        "epochs": len(h.rows),
        "best_epoch": h.best_epoch,
        "valid_auc": h.best_valid_auc,
        "valid_loss": h.best_valid_loss,
        "history": [dict(r) for r in h.rows],
    }


# ---- files ------------------------------------------------------------------------------------------------
def write_log(path: str | os.PathLike, rows: list[dict]) -> None:
    """The per-epoch log as CSV, or as JSON when `path` ends in .json; written atomically."""
    from wsi_vssm.atomic import atomic_write_rows

    atomic_write_rows(path, rows, LOG_COLUMNS)


def save_mil(path: str | os.PathLike, model, metadata: dict) -> None:
    """torch.save a checkpoint of tensors and plain containers only (loads with weights_only=True), atomically."""
    import torch

    from wsi_vssm.atomic import atomic_write_bytes

    ckpt = {
        "format": MIL_FORMAT,
        "mil_config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "metadata": metadata,
    }
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_mil(path: str | os.PathLike):
    """(AttentionMIL or MILEnsemble in eval mode, metadata) from a `save_mil` file, read with weights_only=True."""
    import torch

    from wsi_vssm.models.checkpoint import CheckpointError
    from wsi_vssm.models.mil import MILConfig, make_mil

    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, or not a torch file: one line naming it
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"cannot read MIL checkpoint {path}: {type(e).__name__}: {first}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != MIL_FORMAT:
        raise CheckpointError(f"{path}: not a wsi-vssm MIL checkpoint (expected format {MIL_FORMAT!r})")
    model = make_mil(MILConfig(**ckpt["mil_config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt.get("metadata", {})


def cell_head_from_model(path: str | os.PathLike) -> tuple[dict, str]:
    """The trained cell head ({"weight", "bias"}) of a slide-model file and its backbone's hash."""
    from wsi_vssm.models.checkpoint import CheckpointError, read_checkpoint
    from wsi_vssm.models.model_file import MODEL_FORMAT, state_dict_hash

    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: not a wsi-vssm model file (expected format {MODEL_FORMAT!r})")
    sd = ckpt.get("state_dict", {})
    head = {k.removeprefix("mil.cell_head."): v for k, v in sd.items() if k.startswith("mil.cell_head.")}
    if set(head) != {"weight", "bias"}:
        raise CheckpointError(f"{path}: model file holds no cell head (mil.cell_head.weight / .bias)")
    backbone = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    return head, state_dict_hash(backbone)


def stratified_split(names: Sequence[str], labels: Sequence[int], valid_fraction: float, seed: int):
    """(train names, valid names): each label's slides shuffled with `seed`, a `valid_fraction` share to valid
    (at least one per label when the label has two or more slides, never all of them)."""
    if not 0.0 < valid_fraction < 1.0:
        raise UsageError(f"valid fraction must lie in (0, 1), got {valid_fraction!r}")
    rng = np.random.default_rng(seed)
    train, valid = [], []
    for label in sorted(set(labels)):
        group = sorted(n for n, y in zip(names, labels, strict=True) if y == label)
        group = [group[i] for i in rng.permutation(len(group))]
        k = min(max(1, round(len(group) * valid_fraction)), len(group) - 1) if len(group) >= 2 else 0
        valid += group[:k]
        train += group[k:]
    return sorted(train), sorted(valid)
