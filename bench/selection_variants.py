"""Three cheap ways to a better patch score, tried on the selection part of PCam valid (never the held-back part).
Run on 2026-12-05 with r5, then the shipped model (docs/model_card.md). For r9, trained from scratch, START is
its context-stage model (OUT/context.pt, the start of its dense stage).

    python bench/selection_variants.py --valid .../pcam/valid.tar --start START.pt [--model default]

1. Weight interpolation ("WiSE-FT"): the dense stage's starting model (START, the 2026-11-27 default model:
   `git show f670c22:wsi_vssm/weights/default.pt > START.pt`) and the shipped model, backbone and cell head mixed
   as (1 - alpha) * start + alpha * shipped (its Platt scaling unfolded first); each mix scored with the dense
   stage's own selection score (the mean of the isolated patch AUC and the dense in-mosaic token AUC).
2. Reading an isolated patch otherwise than at its centre token: the mean or the maximum of its 3 x 3 tokens,
   and its centre token with the patch given mirrored context around it.
3. Test-time views: the AUC of each of the 8 flips / quarter turns alone and of subsets of them averaged.
4. The cell threshold under `--tta` (the mean feature map of the 8 views, as predict makes it): the share of
   the selection part's normal tokens in 8 x 8 mosaics at or above the model's `cell_threshold` (set on single
   views for 99.5% token specificity), the sensitivity there, and the threshold 99.5% would give under `--tta`.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

VIEWS = {"id": lambda x: x, "rot90": lambda x: torch.rot90(x, 1, (2, 3)), "rot180": lambda x: torch.rot90(x, 2, (2, 3)),
         "rot270": lambda x: torch.rot90(x, 3, (2, 3)), "hflip": lambda x: x.flip(3), "vflip": lambda x: x.flip(2),
         "transpose": lambda x: x.transpose(2, 3), "antitranspose": lambda x: torch.rot90(x, 2, (2, 3)).transpose(2, 3)}
SUBSETS = [["id", "rot180"], ["id", "hflip"], ["id", "rot90"], ["id", "rot180", "transpose", "antitranspose"],
           ["id", "rot90", "rot180", "rot270"], list(VIEWS)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--valid", required=True, help="PCam valid split (folder or tar)")
    ap.add_argument("--start", required=True, help="the dense stage's starting model file")
    ap.add_argument("--model", default="default", help="the dense-trained model (default: the shipped one)")
    ap.add_argument("--alphas", default="0,0.3,0.5,0.7,0.85,1", help="interpolation weights of --model")
    args = ap.parse_args()

    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.training.cells import TrainCellsConfig, split_valid
    from wsi_vssm.training.data.patches import training_patches
    from wsi_vssm.training.dense import DenseConfig, _select_metrics
    from wsi_vssm.training.dense_eval import mosaic_token_logits, split_tokens

    torch.set_grad_enabled(False)
    select, _ = split_valid(training_patches(args.valid), TrainCellsConfig(seed=0, valid_select=1000))
    start, model = load_model(args.start), load_model(args.model)
    start.eval()
    model.eval()
    end = unfolded_state(model)
    begin = start.state_dict()
    print(f"selection part: {len(select)} patches ({int(np.sum(select.labels))} label 1)")
    print("\n1. weight interpolation, (1 - alpha) * start + alpha * model")
    print("alpha  patch AUC  dense token AUC  sensitivity at 99.5%  score")
    for alpha in (float(a) for a in args.alphas.split(",")):
        model.load_state_dict({k: (1 - alpha) * begin[k] + alpha * v if v.is_floating_point() else v
                               for k, v in end.items()})
        m = _select_metrics(model, select, DenseConfig())
        print(f"{alpha:5.2f}  {m['iso_auc']:9.4f}  {m['dense_auc']:15.4f}  {m['sensitivity_at_0.995']:20.3f}  "
              f"{m['score']:.4f}")
    model.load_state_dict(end)  # Platt scaling is monotonic: AUCs below do not depend on it

    y = np.asarray(select.labels)
    for name, net in (("model", model), ("start", start)):
        reads, views = read_patches(net, select)
        print(f"\n2. {name}: reading an isolated patch (AUC)")
        for k, v in reads.items():
            print(f"  {k:28s} {auc(y, v):.4f}")
        print(f"3. {name}: test-time views (AUC; correlation of the view's probabilities with the unturned ones)")
        for k, v in views.items():
            print(f"  {k:28s} {auc(y, v):.4f}  r = {np.corrcoef(views['id'], v)[0, 1]:.3f}")
        for subset in SUBSETS:
            print(f"  mean of {'+'.join(subset):48s} {auc(y, np.mean([views[k] for k in subset], 0)):.4f}")
    shipped = load_model(args.model)
    threshold = float(shipped.metadata.get("cell_threshold", 0.5))
    print(f"\n4. the cell threshold ({threshold:.4f}) with and without --tta, selection tokens in 8 x 8 mosaics")
    for tta in (False, True):
        order, logits = mosaic_token_logits(shipped, select, 8, tta=tta)
        tokens = split_tokens(np.asarray(select.labels)[order], logits)
        normal = 1 / (1 + np.exp(-np.concatenate([tokens["neg_centre"], tokens["neg_rim"]])))
        pos = 1 / (1 + np.exp(-tokens["pos"]))
        print(f"  tta={tta!s:5}  normal tokens at or above: {100 * np.mean(normal >= threshold):.2f}%  "
              f"positive centres at or above: {100 * np.mean(pos >= threshold):.1f}%  "
              f"99.5% of normal tokens below {np.quantile(normal, 0.995):.4f}")


def unfolded_state(model) -> dict:
    """The model's weights with the dense stage's Platt scaling taken back out of the cell head."""
    platt = model.metadata.get("dense_stage", {}).get("platt", {"a": 1.0, "b": 0.0})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["mil.cell_head.weight"] /= platt["a"]
    state["mil.cell_head.bias"] = (state["mil.cell_head.bias"] - platt["b"]) / platt["a"]
    return state


def read_patches(model, ds, batch: int = 100) -> tuple[dict, dict]:
    from wsi_vssm.models.inputs import normalise_batch

    reads = {k: [] for k in ("centre token", "mean of 3 x 3 tokens", "max of 3 x 3 tokens",
                             "centre, mirrored context")}
    views = {k: [] for k in VIEWS}
    for s in range(0, len(ds), batch):
        x = torch.from_numpy(np.stack([ds[i][0] for i in range(s, min(s + batch, len(ds)))]))
        x = normalise_batch(x.permute(0, 3, 1, 2).float() / 255)
        logits = model.cell_logits(x)
        reads["centre token"].append(logits[:, 1, 1])
        reads["mean of 3 x 3 tokens"].append(logits.flatten(1).mean(1))
        reads["max of 3 x 3 tokens"].append(logits.flatten(1).amax(1))
        wide = F.pad(F.pad(x, (64,) * 4, mode="reflect"), (32,) * 4, mode="replicate")  # 288 px, patch at 3:6
        reads["centre, mirrored context"].append(model.cell_logits(wide)[:, 4, 4])
        for k, view in VIEWS.items():
            views[k].append(torch.sigmoid(model.cell_logits(view(x))[:, 1, 1]))
    cat = lambda d: {k: torch.cat(v).float().numpy() for k, v in d.items()}  # noqa: E731
    return cat(reads), cat(views)


def auc(y, score) -> float:
    from wsi_vssm.outputs.report import roc_auc_or_nan

    return roc_auc_or_nan(y, score)


if __name__ == "__main__":
    main()
