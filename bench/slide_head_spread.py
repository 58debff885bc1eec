"""How far a recipe run's slide-head figure moves when only the head's own training seed changes.

    OMP_NUM_THREADS=2 python bench/slide_head_spread.py --run /work/r9 --run /work/r12 [--seeds 0 1 2 3] \
        [--pools attention mix16] [--out bench/results/slide_head_spread.json]

The recipe's `mosaic_mil` stage fits each slide-head candidate once and keeps the one with the best AUC over the
selection-part mosaics and the pooled bags made of them (`wsi_vssm.training.mosaic`). A ship rule that compares
two runs by that figure has to know how much it moves by chance. This refits the named candidates on a run's own
cached mosaic features (OUT/mosaic_mil/features, kept by the stage; never re-extracted)
with other seeds, everything else as the stage had it: the start head and cell head of OUT/dense.pt (the model
the stage began from; refused unless its backbone made the cached features), the mosaics, the pooled bags and
their size-aware calibration. The stage fits with `mosaic_mil.seed` (0 in the recipe), so that seed should
reproduce the stage's figure. With two or more seeds it also scores their mean (`MILEnsemble`, calibrated on
the pooled bags as one head), which is what `mosaic_mil.ensemble = n` with seeds `seed` ... `seed + n - 1` would
score, at no extra fit. Only the selection part and the training mosaics are read;
nothing held-back. Fits are written to a temporary folder, not into the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_spread(run: Path, seeds: list[int], pools: list[str], progress: bool = True) -> dict:
    """{candidate: {seed: pooled AUC}} for one run folder, with the stage's own figures beside them."""
    from wsi_vssm.models.mil import MILEnsemble, single_head_state
    from wsi_vssm.models.model_file import load_backbone
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.training.mil import Bags, MILTrainConfig
    from wsi_vssm.training.mosaic import (
        MosaicMILConfig,
        candidate_name,
        candidates_of,
        count_threshold_of,
        extract_cohort,
        fit_seed_heads,
        pooled_plan,
        size_aware_fit,
    )

    final = load_model(run / "model.pt").metadata.get("mil_stage") or {}
    if not final.get("config"):
        raise SystemExit(f"{run / 'model.pt'}: no mosaic_mil stage record; run the recipe's mosaic_mil stage first")
    cfg = MosaicMILConfig(**final["config"])
    if cfg.synth_train_slides or cfg.synth_valid_slides:
        raise SystemExit(f"{run}: its stage also trained on synth slides; this bench refits on mosaics alone")
    if not cfg.pooled_sizes:
        raise SystemExit(f"{run}: its stage chose by valid AUC alone (no pooled bags); this bench measures the "
                         "pooled figure")
    start_path = run / "dense.pt"  # the model the stage started from: its head is every candidate's start
    start = load_model(start_path)
    backbone, info = load_backbone(start_path)
    mosaics = run / "mosaic_mil" / "mosaics"
    _check_cache(run / "mosaic_mil" / "features", info.model_hash, start_path)
    bags = {k: extract_cohort(mosaics / k, backbone, info, run / "mosaic_mil" / "features" / k, progress,
                              cfg.precision) for k in ("train", "valid")}
    valid = Bags(bags["valid"], MILTrainConfig().cache_mb)
    plan = pooled_plan(valid.labels, cfg.pooled_sizes, cfg.pooled_bags, cfg.seed)
    head = {k: v.detach().clone() for k, v in start.mil.cell_head.state_dict().items()}
    init = single_head_state(start.mil) if cfg.init_from_model else None
    count_threshold = count_threshold_of(start)
    wanted = {candidate_name(p, k): (p, k) for p, k in candidates_of(cfg)}
    unknown = sorted(set(pools) - set(wanted))
    if unknown:
        raise SystemExit(f"{run}: no candidate {', '.join(unknown)} in its stage (it had {', '.join(wanted)})")
    stage = {c["name"]: c.get("pooled_auc") for c in final.get("candidates", [])}
    out = {"run": str(run), "kept_by_stage": final.get("slide_head"), "stage_pooled_auc": stage, "seeds": seeds,
           "pooled_auc": {}, "ensemble_pooled_auc": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in pools:
            pool, k = wanted[name]
            aucs, started = {}, time.perf_counter()

            def fitted(seed, mil, _history, name=name, aucs=aucs):
                nonlocal started
                aucs[seed] = size_aware_fit(mil, valid, plan)["auc"]
                if progress:
                    print(f"{run.name} {name} seed {seed}: AUC over valid mosaics and pooled bags {aucs[seed]:.4f} "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
                started = time.perf_counter()

            heads, _ = fit_seed_heads(bags, cfg, start.mil.config, (pool, k), count_threshold, head, init, seeds,
                                      lambda seed, name=name: Path(tmp) / f"{name}-{seed}", fitted)
            out["pooled_auc"][name] = aucs
            if len(heads) > 1 and pool != "count":  # count's fit is exact: its seeds agree
                out["ensemble_pooled_auc"][name] = size_aware_fit(MILEnsemble.of(heads), valid, plan)["auc"]
    return out


def _check_cache(features: Path, model_hash: str, start_path: Path) -> None:
    """Refuse unless every cached store was made by `start_path`'s backbone: a stale or missing start model
    would refit on another model's head, and extraction would overwrite the run's cache."""
    from wsi_vssm.pipeline.store import FeatureStore

    stores = sorted(features.glob("*/*.zarr"))
    if not stores or any(FeatureStore.open(s).attrs.get("model_hash") != model_hash for s in stores):
        raise SystemExit(f"{start_path}: not the backbone of the cached features in {features} (or none are "
                         "cached); this bench refits on the stage's own features only")


def summary(aucs: dict) -> dict:
    values = list(aucs.values())
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def _or_dash(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, action="append", required=True, help="a recipe run folder (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--pools", nargs="+", default=["attention", "mix16"], help="candidates to refit, by name")
    ap.add_argument("--out", type=Path, default=Path("bench/results/slide_head_spread.json"))
    a = ap.parse_args(argv)
    results = [run_spread(r, a.seeds, a.pools) for r in a.run]
    print(f"\nAUC over valid (selection-part) mosaics and pooled bags, per head training seed {a.seeds}:")
    print(f"{'run':<10} {'head':<10} {'stage':>7} {'per seed':<36} {'median':>7} {'min-max':>13} {'sd':>6} "
          f"{'mean of seeds':>13}")
    for r in results:
        r["summary"] = {name: summary(aucs) for name, aucs in r["pooled_auc"].items()}
        for name, aucs in r["pooled_auc"].items():
            s = r["summary"][name]
            stage = r["stage_pooled_auc"].get(name)
            print(f"{Path(r['run']).name:<10} {name:<10} {stage if stage is None else f'{stage:.4f}':>7} "
                  f"{' '.join(f'{v:.4f}' for v in aucs.values()):<36} {s['median']:>7.4f} "
                  f"{s['min']:.4f}-{s['max']:.4f} {s['sd']:>6.4f} "
                  f"{_or_dash(r['ensemble_pooled_auc'].get(name)):>13}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
