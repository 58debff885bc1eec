"""What each token specificity would make of a model's cell threshold, on the selection part of PCam valid only.

    python bench/cell_threshold.py --valid .../pcam/valid.tar [--model default] [--spec 0.995 0.99 ...]

The dense stage sets `cell_threshold` so that `token_specificity` of the selection part's normal tokens (every
token of its label-0 patches, tiled 8 x 8 as the stage tiles them) fall below it. For each specificity this
prints that threshold, the share of label-1 centre tokens above it, and the selection patches' sensitivity,
specificity and balanced accuracy there as `wsi-vssm evaluate PATCHES` scores them (each patch alone, the
model's patch calibration); then the same at 0.5 and at the threshold that maximises that balanced accuracy.
The held-back part is never scored (the split only hashes its files, to leave out selection twins).
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--valid", required=True, help="PCam valid split (folder or tar)")
    ap.add_argument("--model", default="default", help="model file (default: the shipped model)")
    ap.add_argument("--spec", type=float, nargs="+", default=[0.995, 0.99, 0.985, 0.98, 0.97, 0.95],
                    help="token specificities to try")
    ap.add_argument("--valid-select", type=int, default=1000, help="as in training: patches that select")
    ap.add_argument("--seed", type=int, default=0, help="the select / held-back split's seed, as in training")
    args = ap.parse_args()

    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.pipeline.predict import patch_probabilities
    from wsi_vssm.training.cells import TrainCellsConfig, split_valid
    from wsi_vssm.training.data.patches import training_patches
    from wsi_vssm.training.dense_eval import mosaic_token_logits, split_tokens
    from wsi_vssm.training.patch_eval import predict_patches

    model = load_model(args.model)
    select, _held_back = split_valid(training_patches(args.valid),
                                     TrainCellsConfig(seed=args.seed, valid_select=args.valid_select))
    order, logits = mosaic_token_logits(model, select, 8, args.seed)
    tokens = split_tokens(np.asarray(select.labels)[order], logits)
    normal = np.concatenate([tokens["neg_centre"], tokens["neg_rim"]])
    p = patch_probabilities(predict_patches(model, select), model.metadata)
    y = np.asarray(select.labels)
    shipped = model.metadata.get("cell_threshold")
    print(f"{args.model}: shipped cell_threshold {shipped if shipped is None else round(float(shipped), 4)}; "
          f"selection part: {len(y)} patches, {normal.size} normal tokens in 8 x 8 mosaics")
    print("| token specificity | cell threshold | tumour centre tokens above | patch sensitivity | patch specificity "
          "| balanced accuracy |")
    def row(name: str, t: float) -> None:
        cut = float(np.log(t / (1 - t)))
        sens, spec = float((p[y == 1] >= t).mean()), float((p[y == 0] < t).mean())
        above = float((tokens["pos"] > cut).mean())
        print(f"| {name} | {t:.3f} | {above:.3f} | {sens:.3f} | {spec:.3f} | {0.5 * (sens + spec):.3f} |")

    for s in args.spec:
        row(f"{s:g}", float(1 / (1 + np.exp(-np.quantile(normal, s)))))
    row("(0.5)", 0.5)
    ts = np.unique(p)
    ba = [0.5 * ((p[y == 1] >= t).mean() + (p[y == 0] < t).mean()) for t in ts]
    best = float(ts[int(np.argmax(ba))])
    spec_of_best = float((normal < np.log(best / (1 - best))).mean())
    row(f"(best: {100 * spec_of_best:.2f}% of normal tokens below)", best)


if __name__ == "__main__":
    main()
