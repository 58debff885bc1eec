"""What each token specificity would make of a model's cell threshold, on the selection part of PCam valid only.

    python bench/cell_threshold.py --valid .../pcam/valid.tar [--model default] [--spec 0.995 0.99 ...]
                                   [--write 0.99]

The dense stage sets `cell_threshold` so that `token_specificity` of the selection part's normal tokens (every
token of its label-0 patches, tiled 8 x 8 as the stage tiles them) fall below it. For each specificity this
prints that threshold, the share of label-1 centre tokens above it, and the selection patches' sensitivity,
specificity and balanced accuracy there as `wsi-vssm evaluate PATCHES` scores them (each patch alone, the
model's patch calibration); then the same at 0.5 and at the threshold that maximises that balanced accuracy.
The held-back part is never scored (the split only hashes its files, to leave out selection twins).
`--write S` stores the threshold for token specificity S in the model file's metadata (`cell_threshold`, and
`cell_threshold_rule` with the table), weights untouched. Contours, lesions and pN stages follow the cell
threshold, so re-choose the lesion rule after it (bench/lesion_rule.py).
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
    ap.add_argument("--write", type=float, metavar="S",
                    help="store the threshold of token specificity S (one of --spec) in the model file")
    ap.add_argument("--valid-select", type=int, default=1000, help="as in training: patches that select")
    ap.add_argument("--seed", type=int, default=0, help="the select / held-back split's seed, as in training")
    args = ap.parse_args()
    if args.write is not None and args.write not in args.spec:
        ap.error(f"--write {args.write:g} is not one of --spec {' '.join(f'{s:g}' for s in args.spec)}")

    from wsi_vssm.models.slide_model import load_model, resolve_model_path
    from wsi_vssm.pipeline.predict import patch_probabilities
    from wsi_vssm.training.cells import TrainCellsConfig, split_valid
    from wsi_vssm.training.data.patches import training_patches
    from wsi_vssm.training.dense_eval import mosaic_token_logits, split_tokens
    from wsi_vssm.training.patch_eval import predict_patches

    path = resolve_model_path(args.model)
    model = load_model(path)
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
    rows = {}

    def row(name: str, t: float) -> None:
        cut = float(np.log(t / (1 - t)))
        sens, spec = float((p[y == 1] >= t).mean()), float((p[y == 0] < t).mean())
        above = float((tokens["pos"] > cut).mean())
        rows[name] = {"cell_threshold": t, "tumour_centre_tokens_above": above, "sensitivity": sens,
                      "specificity": spec, "balanced_accuracy": 0.5 * (sens + spec)}
        print(f"| {name} | {t:.3f} | {above:.3f} | {sens:.3f} | {spec:.3f} | {0.5 * (sens + spec):.4f} |")

    for s in args.spec:
        row(f"{s:g}", float(1 / (1 + np.exp(-np.quantile(normal, s)))))
    row("(0.5)", 0.5)
    ts = np.unique(p)
    ba = [0.5 * ((p[y == 1] >= t).mean() + (p[y == 0] < t).mean()) for t in ts]
    best = float(ts[int(np.argmax(ba))])
    spec_of_best = float((normal < np.log(best / (1 - best))).mean())
    row(f"(best: {100 * spec_of_best:.2f}% of normal tokens below)", best)
    if args.write is not None:
        _write(path, args.write, rows, len(y), normal.size)


def _write(path, spec: float, rows: dict, n_patches: int, n_tokens: int) -> None:
    """The threshold of token specificity `spec` into the model file; a lesion rule of seed cells only follows
    it (its extent was the old cell threshold)."""
    import io

    import torch

    from wsi_vssm.atomic import atomic_write_bytes

    ckpt = torch.load(path, weights_only=True)
    meta = ckpt["metadata"]
    old, new = meta.get("cell_threshold"), rows[f"{spec:g}"]["cell_threshold"]
    meta.update(cell_threshold=new, cell_threshold_rule={
        "chosen_by": "python bench/cell_threshold.py", "token_specificity": spec, "previous": old,
        "selection_patches": n_patches, "selection_normal_tokens": n_tokens, "candidates": rows})
    if old is not None and meta.get("lesion_extent_threshold") == old:
        meta["lesion_extent_threshold"] = new
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())
    print(f"wrote cell_threshold {new:.4f} (token specificity {spec:g}; was {old}) into {path}; "
          "re-choose the lesion rule now: python bench/lesion_rule.py")


if __name__ == "__main__":
    main()
