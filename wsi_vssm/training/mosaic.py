"""The MIL stage on mosaic cohorts: the slide head of a trained model, fitted on slides built from real patches.

With no labelled whole-slide cohort at hand, slides are tiled from labelled patches (`wsi_vssm.synth.mosaic`):
training slides from the training patches, validation slides from the validation split's *selection* part, and
(optionally) test slides from its *held-back* part, so each slide cohort inherits the patch split's separation.
Every slide goes through the same path as a user's slide (pyramidal TIFF -> reader -> tissue mask -> backbone ->
FeatureStore); the MIL head is then trained by `train_mil` (training slides train, validation slides select the
epoch and the slide threshold) and attached to the model. The test cohort, when asked for, is scored once by
`evaluate_cohort` on the final model and only reported.

    wsi-vssm run pipelines/default.toml ...   # stage "mosaic_mil" (docs/training.md)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from wsi_vssm.errors import UsageError
from wsi_vssm.training.mosaic_aucs import main, pooling_aucs, slide_probs  # noqa: F401 (main: `python -m`)


@dataclass
class MosaicMILConfig:
    train_slides: int = 160  # mosaics of training patches (half tumour)
    valid_slides: int = 48  # mosaics of the validation split's selection part
    test_slides: int = 0  # mosaics of its held-back part, scored once at the end (0: none)
    grid: int | list[int] = 8  # patches per mosaic side (8 x 96 px = 768 px at 0.97 um/px), or [low, high]:
    #                           each slide draws its side, so bags vary in size as slides do
    max_lesion_frac: float = 0.3  # the largest lesion, as a share of the tissue cells
    seed: int = 0
    epochs: int = 60
    patience: int = 15
    lr: float = 1e-3
    max_cells: int | None = None
    init_from_model: bool = True  # start from the model's current MIL head (else a fresh seeded one)
    ensemble: int = 1  # heads per candidate, trained with seeds seed, seed + 1, ...; their mean slide logit is the
    #                    candidate (models.mil.MILEnsemble): one head's AUC moves with its seed alone
    synth_train_slides: int = 0  # also train on this many `wsi-vssm synth` slides: continuous tissue, larger bags
    synth_valid_slides: int = 0  # ... and select on this many more, beside the valid mosaics
    synth_size: int = 6000  # their side in px at synth_mpp
    synth_mpp: float = 0.5
    precision: str = "fp32"  # fp32 | bf16 | auto: feature extraction and MIL training (models.precision)
    pool: str | list[str] = "attention"  # slide-head candidates (models.mil POOLS); the best (pooled) AUC is kept
    topk: int | list[int] = 8  # top-k sizes tried by the topk and mix candidates
    reuse: bool = False  # mosaics larger than their patch pool reuse patches under flips / quarter turns
    calibrate: bool = True  # Platt-scale the chosen head's slide logit on the valid mosaics (and pooled bags)
    # Real slides hold 10-100x the cells of a mosaic. Pooled valid bags (unions of m valid mosaics: m normal
    # ones, or one tumour mosaic and m - 1 normal ones) stand in for them: the head is chosen by its AUC over
    # the mosaics and these bags together, after a calibration with a log(cells) term fitted on the same bags,
    # and the slide threshold is set on them. Empty: choose by valid AUC and Platt-scale without a size term.
    pooled_sizes: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32])
    pooled_bags: int = 60  # pooled bags per size, half tumour

    def __post_init__(self):
        from wsi_vssm.models.precision import check_precision
        from wsi_vssm.training.config_checks import check_mosaic_config

        check_precision(self.precision)
        check_mosaic_config(self)
        sizes = [self.pooled_sizes] if isinstance(self.pooled_sizes, int) else list(self.pooled_sizes)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 2 for m in sizes):
            raise UsageError(f"mosaic_mil.pooled_sizes must be ints >= 2, got {self.pooled_sizes!r}")
        self.pooled_sizes = sizes
        if sizes and int(self.pooled_bags) < 2:
            raise UsageError(f"mosaic_mil.pooled_bags must be >= 2, got {self.pooled_bags!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def youden_threshold(labels, probs) -> float:
    """The probability threshold that maximises sensitivity + specificity (ties: the median of the tied
    thresholds); 0.5 when the labels hold one class only."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(probs, dtype=np.float64)
    y, p = y[np.isfinite(p)], p[np.isfinite(p)]  # slides without tissue cells have no probability
    if y.all() or not y.any():
        return 0.5
    cands = np.unique(p)
    j = np.array([(p[y] >= t).mean() + (p[~y] < t).mean() for t in cands])
    best = np.flatnonzero(j == j.max())
    return float(cands[best[len(best) // 2]])


def _say(progress: bool, msg: str) -> None:
    if progress:
        import click

        click.echo(msg)


def build_cohorts(train_src, valid_src, out: Path, cfg: MosaicMILConfig, valid_select: int | None,
                  split_seed: int, progress: bool = True) -> dict[str, Path]:
    """Write the mosaic cohorts under out/mosaics/{train,valid[,test]}; returns their folders."""
    from wsi_vssm.synth.mosaic import make_mosaic_cohort
    from wsi_vssm.training.cells import TrainCellsConfig, split_valid
    from wsi_vssm.training.data.patches import training_patches

    train = training_patches(train_src)
    select, holdout = split_valid(training_patches(valid_src), TrainCellsConfig(seed=split_seed,
                                                                             valid_select=valid_select))
    parts = {"train": (train, cfg.train_slides, cfg.seed), "valid": (select, cfg.valid_slides, cfg.seed + 1)}
    if cfg.test_slides:
        if holdout is None or not len(holdout):
            raise UsageError("mosaic_mil.test_slides needs a held-back validation part (cells.valid_select)")
        parts["test"] = (holdout, cfg.test_slides, cfg.seed + 2)
    folders = {}
    for name, (patches, n, seed) in parts.items():
        folder = out / "mosaics" / name
        t0 = time.perf_counter()
        grid = tuple(cfg.grid) if isinstance(cfg.grid, list) else cfg.grid
        make_mosaic_cohort(folder, patches, n, seed, grid, max_lesion_frac=cfg.max_lesion_frac,
                           prefix=f"{name}_", reuse=cfg.reuse)
        _say(progress, f"mosaic_mil: {n} {name} mosaics from {len(patches)} patches ({patches.source}) -> {folder} "
                       f"in {time.perf_counter() - t0:.0f} s")
        folders[name] = folder
    for name, n, seed in (("synth_train", cfg.synth_train_slides, cfg.seed + 10),
                          ("synth_valid", cfg.synth_valid_slides, cfg.seed + 11)):
        if n:
            from wsi_vssm.synth import make_cohort

            folder, t0 = out / "synth" / name.removeprefix("synth_"), time.perf_counter()
            make_cohort(folder, n, seed, cfg.synth_size, cfg.synth_mpp)
            _say(progress, f"mosaic_mil: {n} synthetic slides ({cfg.synth_size} px) -> {folder} in "
                           f"{time.perf_counter() - t0:.0f} s")
            folders[name] = folder
    return folders


def extract_cohort(folder: Path, backbone, info, features: Path, progress: bool = True,
                   precision: str = "fp32") -> list[tuple[Path, int]]:
    """Feature stores of every slide of a cohort folder (kept when already made by the same backbone);
    `backbone, info` as from `wsi_vssm.models.model_file.load_backbone`."""
    from wsi_vssm.io.slide import open_slide
    from wsi_vssm.pipeline.extract import Inference, extract_to_store
    from wsi_vssm.pipeline.store import FeatureStore
    from wsi_vssm.runs.cohort import read_cohort

    cohort = read_cohort(folder)
    features.mkdir(parents=True, exist_ok=True)
    bags, t0 = [], time.perf_counter()
    for i, row in enumerate(cohort.rows):
        if not row.ok:
            raise UsageError(f"{folder}: {row.error}")
        store = features / f"{row.name}.zarr"
        if not (store.exists() and FeatureStore.open(store).attrs.get("model_hash") == info.model_hash):
            with open_slide(row.path, mpp=row.mpp) as slide:
                extract_to_store(slide, backbone, store, mpp=info.mpp, token_px=info.token_px, info=info,
                                 inference=Inference(precision))
        bags.append((store, row.label))
        if progress and (i + 1) % 20 == 0:
            _say(progress, f"  features: {i + 1}/{len(cohort.rows)} slides of {folder.name} "
                           f"({time.perf_counter() - t0:.0f} s)")
    return bags


def train_mil_on_mosaics(model_path: str | Path, train_src, valid_src, out: str | Path, cfg: MosaicMILConfig,
                         valid_select: int | None = None, split_seed: int = 0, progress: bool = True) -> dict:
    """Build the cohorts, extract features, train the MIL head, attach it to `model_path` (rewritten), and
    score the test cohort if asked. Returns the stage's record (also stored in the model's metadata)."""
    from wsi_vssm.models.mil import single_head_state
    from wsi_vssm.models.model_file import load_backbone
    from wsi_vssm.models.slide_model import attach_mil, load_model, save_model
    from wsi_vssm.training.checkpoint import stamped
    from wsi_vssm.training.mil import Bags, MILTrainConfig, bag_logits, evaluate
    from wsi_vssm.training.mil_bags import settings_of

    model_path, out = Path(model_path), Path(out)
    t0 = time.perf_counter()
    folders = build_cohorts(train_src, valid_src, out, cfg, valid_select, split_seed, progress)
    backbone, info = load_backbone(model_path)
    bags = {k: extract_cohort(v, backbone, info, out / "features" / k, progress, cfg.precision)
            for k, v in folders.items()
            if k != "test"}
    for part in ("train", "valid"):  # synthetic slides, when asked for, join the mosaics of their part
        bags[part] = bags[part] + bags.pop(f"synth_{part}", [])
    model = load_model(model_path)
    current = model.mil
    head = {k: v.detach().clone() for k, v in current.cell_head.state_dict().items()}
    init = single_head_state(current) if cfg.init_from_model else None  # the current head, as a start
    valid = Bags(bags["valid"], MILTrainConfig().cache_mb)  # read once: the choice, the calibration, the baselines
    count_threshold = count_threshold_of(model)
    candidates = []
    for pool, k in candidates_of(cfg):
        name = candidate_name(pool, k)
        n = 1 if pool == "count" else cfg.ensemble  # count is an exact convex fit: every seed gives the same head

        def fitted(seed, mil, history, n=n, name=name):
            if n > 1:
                _say(progress, f"mosaic_mil: slide head {name}-seed{seed}: valid slide AUC "
                               f"{history.best_valid_auc:.4f} (epoch {history.best_epoch})")

        heads, histories = fit_seed_heads(
            bags, cfg, current.config, (pool, k), count_threshold, head, init, range(cfg.seed, cfg.seed + n),
            lambda seed, n=n, name=name: out / (f"mil-{name}" if n == 1 else f"mil-{name}-seed{seed}"), fitted)
        c = {"name": name, "pool": pool, "topk": k, "valid_slide_auc": histories[0].best_valid_auc,
             "best_epoch": histories[0].best_epoch, "mil": heads[0], "histories": histories}
        if n > 1:
            c.update(ensemble_candidate(heads, histories, valid, out / f"mil-{name}.pt"))
        candidates.append(c)
        _say(progress, f"mosaic_mil: slide head {name}{f' (mean of {n})' if n > 1 else ''}: "
                       f"valid slide AUC {c['valid_slide_auc']:.4f}"
                       + (f" (epoch {c['best_epoch']})" if n == 1 else ""))
    plan = pooled_plan(valid.labels, cfg.pooled_sizes, cfg.pooled_bags, cfg.seed) if cfg.pooled_sizes else None
    if plan is not None:  # every candidate scored on the pooled bags under its own size-aware calibration
        for c in candidates:
            c["pooled"] = size_aware_fit(c["mil"], valid, plan)
            _say(progress, f"mosaic_mil: slide head {c['name']}: AUC over valid mosaics and pooled bags "
                           f"{c['pooled']['auc']:.4f} (size-aware calibration)")
        chosen = max(candidates, key=lambda c: c["pooled"]["auc"])  # first of equals: the listed order decides
    else:
        chosen = max(candidates, key=lambda c: c["valid_slide_auc"])
    mil, mil_path = chosen["mil"], out / f"mil-{chosen['name']}.pt"
    fit = chosen_fit(chosen)
    platt = None
    if cfg.calibrate:
        if plan is not None:
            platt = chosen["pooled"]["platt"]
        else:
            from wsi_vssm.training.dense_eval import fit_platt

            logits = bag_logits(mil, valid)
            ok = np.isfinite(logits)
            platt = (*fit_platt(logits[ok], np.asarray(valid.labels)[ok]), 0.0)
        mil.calibrate(*platt)
    if plan is not None:
        logits, log_n, labels, sizes = pooled_logits(mil, valid, plan)
        probs = 0.5 * (1 + np.tanh(0.5 * logits))  # the logistic function, without exp overflowing
        threshold = youden_threshold(labels, probs)
        by_size = size_table(labels, probs, sizes, log_n, threshold)
        for row in by_size:
            _say(progress, f"  {row['mosaics']:>2} mosaic(s), ~{row['median_cells']} cells: AUC {row['auc']:.3f}, "
                           f"sensitivity {row['sensitivity']:.2f}, specificity {row['specificity']:.2f}, normal "
                           f"median probability {row['normal_median_prob']:.2f}")
    else:
        threshold, by_size = youden_threshold(valid.labels, slide_probs(mil, valid)), None
    train_loss, train_auc = evaluate(mil, Bags(bags["train"], MILTrainConfig().cache_mb))
    pooled = pooling_aucs(valid, head)
    epochs = (f"best epoch {fit['best_epoch']} of {fit['epochs_run']}" if "members" not in chosen else
              "best epochs " + ", ".join(f"{b} of {n}" for b, n in zip(fit["best_epoch"], fit["epochs_run"],
                                                                       strict=True)) + " (per seed)")
    _say(progress, f"mosaic_mil: {epochs}: valid slide AUC "
                   f"{fit['valid_slide_auc']:.4f} (train {train_auc:.4f}); threshold {threshold:.4f} (Youden, valid"
                   f"{' mosaics and pooled bags' if plan is not None else ''}); "
                   f"valid AUC of plain cell-logit pooling: " + ", ".join(f"{k} {v:.4f}" for k, v in pooled.items()))
    model = attach_mil(model, mil_path)
    if platt is not None:
        model.mil.calibrate(*platt)
    record = {"method": "AttentionMIL trained on mosaic slides of real patches (wsi_vssm.synth.mosaic)",
              "config": cfg.to_dict(), "train_slides": len(bags["train"]), "valid_slides": len(bags["valid"]),
              "slide_head": chosen["name"],
              "platt": None if platt is None else {"a": platt[0], "b": platt[1], "size_slope": platt[2]},
              "candidates": [{**{k: c[k] for k in ("name", "pool", "topk", "valid_slide_auc", "best_epoch")},
                              **({"pooled_auc": c["pooled"]["auc"]} if plan is not None else {}),
                              **({"members": c["members"]} if "members" in c else {})}
                             for c in candidates],
              "pooled_bags": None if plan is None else {"sizes": cfg.pooled_sizes, "per_size": cfg.pooled_bags,
                                                        "bags": len(plan), "by_size": by_size},
              **fit, "train_slide_auc": train_auc, "train_slide_loss": train_loss, "threshold": threshold,
              "valid_pooling_aucs": pooled,
              # its extract settings: predict warns at others
              "features": settings_of([p for part in ("train", "valid") for p, _ in bags[part]])}
    # `slide_threshold` is what predict reads; `threshold`, its old name, for readers of older files
    meta = stamped({**dict(getattr(model, "metadata", {}) or {}), "stage": "mosaic_mil", "mil_stage": record,
                    "slide_threshold": threshold, "threshold": threshold})
    record["seconds"] = round(time.perf_counter() - t0, 1)
    save_model(model, model_path, meta)
    if "test" in folders:  # scored by the file just written, as a user's `evaluate` would
        record["test"] = score_test_cohort(folders["test"], model_path, out / "test-eval", progress)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        save_model(model, model_path, meta)
    return record


def fit_seed_heads(bags: dict, cfg: MosaicMILConfig, head_config, candidate: tuple[str, int],
                   count_threshold: float, cell_head: dict, init, seeds, stem, fitted=None) -> tuple[list, list]:
    """One slide head per seed for a candidate (pool, k), all from the same start (`init`, the frozen
    `cell_head`), trained on bags["train"] and stopped on bags["valid"]: ([heads], [histories]) in seed order.
    `stem(seed)` is each head's file stem (checkpoint STEM.pt, per-epoch log STEM.log.csv); `fitted(seed, head,
    history)` is told as each one finishes. The stage and bench/slide_head_spread.py fit through this, so the
    bench's seeds are the stage's."""
    from wsi_vssm.training.mil import train_mil

    heads, histories = [], []
    for seed in seeds:
        mil_cfg = candidate_config(cfg, head_config, *candidate, count_threshold, seed=seed)
        path = Path(stem(seed))
        mil, history = train_mil(bags["train"], bags["valid"], mil_cfg, cell_head=cell_head,
                                 log_path=path.with_name(path.name + ".log.csv"),
                                 checkpoint_path=path.with_name(path.name + ".pt"), init_state=init)
        heads.append(mil)
        histories.append(history)
        if fitted is not None:
            fitted(seed, mil, history)
    return heads, histories


def chosen_fit(c: dict) -> dict:
    """The stage record's account of the kept candidate's training: its best epoch, epochs run, valid slide AUC
    and loss, and its per-epoch log; for an ensemble, per member (lists, in seed order)."""
    hs = c["histories"]
    if len(hs) == 1:
        h = hs[0]
        return {"best_epoch": h.best_epoch, "epochs_run": len(h.rows), "valid_slide_auc": h.best_valid_auc,
                "valid_slide_loss": h.best_valid_loss, "log": h.rows}
    return {"best_epoch": [h.best_epoch for h in hs], "epochs_run": [len(h.rows) for h in hs],
            "valid_slide_auc": c["valid_slide_auc"], "valid_slide_loss": c["valid_slide_loss"],
            "log": [h.rows for h in hs]}


def ensemble_candidate(heads, histories, valid, path: Path) -> dict:
    """A candidate made of several seeds' heads, saved as one MIL checkpoint at `path` (what the stage
    attaches; `training.ensemble.save_ensemble`); `best_epoch` is null: each member stopped at its own (listed)."""
    from wsi_vssm.training.ensemble import save_ensemble

    e = save_ensemble(heads, histories, valid, path)
    return {"mil": e["mil"], "valid_slide_auc": e["valid_auc"], "valid_slide_loss": e["valid_loss"],
            "best_epoch": None, "members": e["members"]}


def pooled_plan(labels, sizes, per_size: int, seed: int) -> list[tuple[list[int], int]]:
    """Bags of valid mosaics for a size-aware choice and calibration: each mosaic alone, then for each m in
    `sizes`, `per_size` unions of m mosaics drawn with replacement, alternating normal (m normal mosaics) and
    tumour (one tumour mosaic and m - 1 normal ones: its lesions shrink to a smaller share of the slide, as a
    metastasis in a large slide). Returns (mosaic indices, label) per bag."""
    y = np.asarray(labels)
    normal, tumour = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    plan = [([i], int(y[i])) for i in range(len(y))]
    if not len(normal) or not len(tumour):
        return plan
    rng = np.random.default_rng([seed, 31])
    for m in sizes:
        for j in range(per_size):
            label = j % 2
            pick = [int(i) for i in rng.choice(normal, m - label)] + ([int(rng.choice(tumour))] if label else [])
            plan.append((pick, label))
    return plan


def pooled_logits(mil, bags, plan) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(slide logit, log(cells), label, mosaics) of each bag of `plan` over a `train_mil.Bags`; bags without
    cells are left out."""
    import torch

    mil.eval()
    rows = []
    with torch.inference_mode():
        for pick, label in plan:
            feats = np.concatenate([np.asarray(bags.features(i), dtype=np.float32) for i in pick])
            if len(feats):
                logit = float(mil(torch.from_numpy(feats)).slide_logit[0])
                rows.append((logit, float(np.log(len(feats))), label, len(pick)))
    a = np.asarray(rows, np.float64).reshape(-1, 4)
    return a[:, 0], a[:, 1], a[:, 2].astype(int), a[:, 3].astype(int)


def size_aware_fit(mil, bags, plan) -> dict:
    """A candidate head's size-aware Platt fit (a, b, c) on the pooled bags and its AUC over all of them."""
    from wsi_vssm.outputs.report import roc_auc_or_nan as roc_auc
    from wsi_vssm.training.dense_eval import fit_platt_sized

    logits, log_n, labels, _ = pooled_logits(mil, bags, plan)
    a, b, c = fit_platt_sized(logits, log_n, labels)
    return {"platt": (a, b, c), "auc": float(roc_auc(labels, a * logits + b + c * log_n))}


def size_table(labels, probs, sizes, log_n, threshold: float) -> list[dict]:
    """Per bag size (mosaics per bag): AUC, sensitivity and specificity at `threshold`, and the median
    probability of normal bags; a head that holds as slides grow keeps these flat."""
    from wsi_vssm.outputs.report import roc_auc_or_nan as roc_auc

    rows = []
    for m in np.unique(sizes):
        s = sizes == m
        y, p = labels[s].astype(bool), probs[s]
        rows.append({"mosaics": int(m), "bags": int(s.sum()), "median_cells": int(round(np.exp(np.median(log_n[s])))),
                     "auc": float(roc_auc(y, p)), "sensitivity": float((p[y] >= threshold).mean()),
                     "specificity": float((p[~y] < threshold).mean()),
                     "normal_median_prob": float(np.median(p[~y]))})
    return rows


def candidates_of(cfg: MosaicMILConfig) -> list[tuple[str, int]]:
    """(pool, topk) slide heads to train: attention and count once, topk and mix once per top-k size."""
    from wsi_vssm.models.mil import TOPK_POOLS

    pools = [cfg.pool] if isinstance(cfg.pool, str) else list(cfg.pool)
    ks = [cfg.topk] if isinstance(cfg.topk, int) else list(cfg.topk)
    return [(p, k) for p in pools for k in (ks if p in TOPK_POOLS else [ks[0]])]


def candidate_name(pool: str, k: int) -> str:
    from wsi_vssm.models.mil import head_name

    return head_name(pool, k)


def candidate_config(cfg: MosaicMILConfig, head_config, pool: str, k: int, count_threshold: float,
                     seed: int | None = None):
    """The MIL training settings of one slide-head candidate; `head_config`: the model's current head's config
    (its widths and dropout); `seed`: the head's own training seed (default: the stage's)."""
    from wsi_vssm.training.mil import MILTrainConfig

    return MILTrainConfig(hidden_dim=head_config.hidden_dim, attn_dim=head_config.attn_dim,
                          dropout=head_config.dropout, epochs=cfg.epochs, patience=cfg.patience, lr=cfg.lr,
                          seed=cfg.seed if seed is None else seed, max_cells=cfg.max_cells,
                          precision=cfg.precision, pool=pool, topk=k, count_threshold=count_threshold)


def count_threshold_of(model) -> float:
    """The count head counts the cells the heatmap calls tumour: those at or above the model's cell threshold
    (as a logit)."""
    from wsi_vssm.pipeline.predict import PredictParams, cell_threshold

    return _logit(cell_threshold(model, PredictParams(), warn=False))


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-6), 1 - 1e-6)
    return float(np.log(p / (1 - p)))


def score_test_cohort(folder: Path, model_path: Path, out: Path, progress: bool = True) -> dict:
    """`wsi-vssm evaluate` on the held-out mosaics with the model file just written; its metrics. The file is
    read back, as a user's `evaluate` would read it: the threshold it applies is the one stored there."""
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.runs.evaluate import evaluate_cohort

    res = evaluate_cohort(folder, load_model(model_path), out, model_path=model_path)
    m = res.metrics
    _say(progress, f"mosaic_mil: held-out test mosaics (n={m['n']}, never used to train or select): slide AUC "
                   f"{m['auc']:.4f} [{m['auc_ci95'][0]:.4f}, {m['auc_ci95'][1]:.4f}], accuracy {m['accuracy']:.4f}")
    return {k: m[k] for k in ("n", "n_failed", "auc", "auc_ci95", "accuracy", "sensitivity", "specificity",
                              "threshold")}


if __name__ == "__main__":  # the model card runs it as `python -m wsi_vssm.training.mosaic`
    from wsi_vssm.training.mosaic_aucs import main

    raise SystemExit(main())
