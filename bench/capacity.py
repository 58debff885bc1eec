"""Capacity at equal wall time (issue 12): `micro` against a wider config, trained from scratch on the same patches
for the same wall-clock budget, selected on valid's selection part.

    python bench/capacity.py --train .../pcam/train.tar --valid .../pcam/valid.tar \
        [--minutes 15] [--archs micro micro_wide] [--out runs/capacity]

Equal wall time: first, each config's training throughput (the cells stage's step: 64 patches of 96 px, forward,
backward, AdamW) is measured side by side in this process, interleaved, as a median. Each config then trains for
throughput x budget patches. A busy machine stretches both runs alike, so the split stays fair; each run's own
training seconds are printed too. Validation time is not counted.

Recipe: the [cells] stage of pipelines/default.toml (learning rate, warmup, EMA, augmentation, selection split),
with a cosine schedule over each config's own budget and no early stop. Printed per config: the best selection
AUC (what a recipe chooses by) and, for that checkpoint, the held-back AUC alone and in 8 x 8 mosaics. The held-back
figures are reported, never used to choose.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wsi_vssm.atomic import atomic_write_json

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "default.toml"
EPOCH_PATCHES = 5000


def step_rate(archs: list[str], batch: int = 64, side: int = 96, rounds: int = 5, steps: int = 3) -> dict:
    """Training patches/s of each arch: median over `rounds` interleaved timings of `steps` steps each."""
    from wsi_vssm.models.slide_model import SlideModel

    setups = {}
    for arch in archs:
        torch.manual_seed(0)
        model = SlideModel.create(arch).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        setups[arch] = (model, opt)
    x, y = torch.randn(batch, 3, side, side), torch.randint(0, 2, (batch,)).float()

    def step(model, opt):
        opt.zero_grad(set_to_none=True)
        logits = model.cell_logits(x)
        loss = F.binary_cross_entropy_with_logits(logits[:, logits.shape[1] // 2, logits.shape[2] // 2], y)
        loss.backward()
        opt.step()

    for model, opt in setups.values():
        step(model, opt)  # warm-up: kernels compiled, buffers sized
    times = {arch: [] for arch in archs}
    for _ in range(rounds):
        for arch, (model, opt) in setups.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step(model, opt)
            times[arch].append((time.perf_counter() - t0) / steps)
    return {arch: batch / statistics.median(t) for arch, t in times.items()}


def cells_config(arch: str, epochs: int):
    from wsi_vssm.training.cells import TrainCellsConfig
    from wsi_vssm.training.recipe import load_recipe

    cells = load_recipe(RECIPE)["cells"]
    keep = ("batch_size", "lr", "weight_decay", "warmup_frac", "seed", "valid_select", "ema", "mpp", "token_px",
            "augment")
    return TrainCellsConfig(arch=arch, epochs=epochs, epoch_size=EPOCH_PATCHES, patience=epochs, mil_bags=0,
                            **{k: cells[k] for k in keep if k in cells})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, help="PCam train split (folder or tar)")
    ap.add_argument("--valid", required=True, help="PCam valid split (selection part selects; the rest is reported)")
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget per config (default 15)")
    ap.add_argument("--archs", nargs="+", default=["micro", "micro_wide"])
    ap.add_argument("--out", default="runs/capacity")
    args = ap.parse_args(argv)

    from wsi_vssm.training.cells import train_cells
    from wsi_vssm.training.data.patches import load_patches

    rates = step_rate(args.archs)
    print("training throughput, side by side (64 x 96 px steps): "
          + ", ".join(f"{a} {r:.1f} patches/s" for a, r in rates.items()), flush=True)
    train, valid = load_patches(args.train), load_patches(args.valid)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.minutes * 60
    rows = []
    for arch in args.archs:
        epochs = max(1, round(rates[arch] * budget / EPOCH_PATCHES))
        print(f"{arch}: {epochs} epochs of {EPOCH_PATCHES} patches (= {rates[arch]:.1f} patches/s x "
              f"{budget:.0f} s)", flush=True)
        res = train_cells(train, valid, out / f"{arch}.pt", cells_config(arch, epochs), progress=False)
        hold = res.holdout or {}
        rows.append({"arch": arch, "patches_per_s": rates[arch], "epochs": epochs,
                     "train_patches": epochs * EPOCH_PATCHES,
                     "train_seconds": sum(r["seconds"] for r in res.log), "best_epoch": res.best_epoch,
                     "select_auc": res.select["auc"], "select_curve": [r["valid_auc"] for r in res.log],
                     "holdout_auc": hold.get("auc"), "holdout_mosaic_auc": hold.get("mosaic_auc"),
                     "holdout_n": hold.get("n")})
        print(f"{arch}: selection AUC {res.select['auc']:.4f} (best epoch {res.best_epoch}/{epochs}); held-back "
              f"AUC {hold.get('auc', float('nan')):.4f}, in mosaics {hold.get('mosaic_auc', float('nan')):.4f}",
              flush=True)
    print(f"\n{'config':<12} {'patches/s':>9} {'epochs':>6} {'train s':>8} {'select AUC':>10} {'held-back':>9} "
          f"{'in mosaics':>10}")
    for r in rows:
        print(f"{r['arch']:<12} {r['patches_per_s']:>9.1f} {r['epochs']:>6} {r['train_seconds']:>8.0f} "
              f"{r['select_auc']:>10.4f} {r['holdout_auc'] or float('nan'):>9.4f} "
              f"{r['holdout_mosaic_auc'] or float('nan'):>10.4f}")
    best = max(rows, key=lambda r: r["select_auc"])
    print(f"chosen on the selection AUC: {best['arch']}")
    atomic_write_json(out / "capacity.json", {"minutes": args.minutes, "epoch_patches": EPOCH_PATCHES,
                                              "threads": torch.get_num_threads(), "rows": rows,
                                              "chosen": best["arch"]})
    print(f"wrote {out / 'capacity.json'}")


if __name__ == "__main__":
    main()
