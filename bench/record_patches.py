"""Record in a model file which patches trained it and which selected it, for a file made before training kept
that record (`wsi_vssm.training.data.fingerprints`; `train cells` and the recipe's `dense` stage write it).

    python bench/record_patches.py --model M --train TRAIN --valid VALID [--valid-select 1000] [--seed 0] [--write]
                                   [--score]

The selection part is split from VALID exactly as training split it (`select_and_holdout` with the model's
`valid_select` and `seed`, which the file's metadata states; the options override them). It prints how many
patches each part holds and how many of VALID the record marks, then with `--write` merges the record into the
file's metadata; the weights are untouched (their hash is checked before and after). `--score` scores the
held-back part (isolated patches, the model's patch calibration) with and without the held-back files that are
byte-identical to a selection patch, to show what those repeats do to the held-back AUC.
"""

from __future__ import annotations

import argparse
import io


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a model file, or 'default'")
    ap.add_argument("--train", required=True, help="the training patches (folder or tar)")
    ap.add_argument("--valid", required=True, help="the validation patches the selection part was split from")
    ap.add_argument("--valid-select", type=int, help="selection-part size (default: the file's metadata)")
    ap.add_argument("--seed", type=int, help="the split's seed (default: the file's metadata)")
    ap.add_argument("--write", action="store_true", help="store the record in the model file's metadata")
    ap.add_argument("--score", action="store_true", help="held-back AUC with and without the repeated files")
    a = ap.parse_args(argv)

    import torch

    from wsi_vssm.atomic import atomic_write_bytes
    from wsi_vssm.models.model_file import state_dict_hash
    from wsi_vssm.models.slide_model import resolve_model_path
    from wsi_vssm.training.data.fingerprints import KEY, patch_digests, patch_record, patches_seen
    from wsi_vssm.training.data.patches import select_and_holdout, training_patches

    path = resolve_model_path(a.model)
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    meta = ckpt["metadata"]
    stage = meta.get("dense_stage", {}).get("config", meta.get("config", {}))
    n_select = a.valid_select if a.valid_select is not None else stage.get("valid_select")
    seed = a.seed if a.seed is not None else stage.get("seed", meta.get("seed", 0))
    train, valid = training_patches(a.train), training_patches(a.valid)
    select, holdout = select_and_holdout(valid, n_select, seed)
    record = patch_record(train, select, meta.get(KEY))
    seen = patches_seen(patch_digests(valid), {KEY: record})
    print(f"{path}: trained on {len(train)} patches of {a.train}, selected on {len(select)} of the {len(valid)} of "
          f"{a.valid} (valid_select {n_select}, seed {seed}); of {a.valid}: {seen}")
    if a.write:
        before = state_dict_hash(ckpt["state_dict"])
        meta[KEY] = record
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        atomic_write_bytes(path, buf.getvalue())
        after = state_dict_hash(torch.load(path, weights_only=True, map_location="cpu")["state_dict"])
        assert after == before, "the weights changed"
        print(f"wrote the record into {path} (weights {after[:12]}, unchanged)")
    if a.score and holdout is not None:
        _score(path, holdout, record)
    return 0


def _score(path, holdout, record) -> None:
    import numpy as np

    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.outputs.report import roc_auc
    from wsi_vssm.pipeline.predict import patch_probabilities
    from wsi_vssm.training.data.fingerprints import KEY, patch_digests, recorded
    from wsi_vssm.training.patch_eval import predict_patches

    model = load_model(path)
    repeats = np.isin(patch_digests(holdout), recorded({KEY: record}, "select"))
    p = patch_probabilities(predict_patches(model, holdout), model.metadata)
    y = np.asarray(holdout.labels)
    print(f"held-back part: n={len(holdout)} AUC {roc_auc(y, p):.4f}; without the {int(repeats.sum())} files "
          f"byte-identical to a selection patch (labels 0/1: {np.bincount(y[repeats], minlength=2).tolist()}): "
          f"n={int((~repeats).sum())} AUC {roc_auc(y[~repeats], p[~repeats]):.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
