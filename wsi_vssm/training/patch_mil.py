"""The MIL head's first fit, the cell stage's last step: synthetic bags of training patches' centre-token
features, so the slide head starts from something sensible before any slide-level stage."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from wsi_vssm.models.slide_model import SlideModel
from wsi_vssm.outputs.report import roc_auc_or_nan
from wsi_vssm.training.data.patches import PatchDataset, stratified_subset
from wsi_vssm.training.patch_eval import centre_features


def fit_mil_on_patch_bags(model: SlideModel, train: PatchDataset, cfg,
                          progress: bool = False) -> dict:
    """Initialise the attention/classifier layers of the MIL head on synthetic bags of training patches.

    A bag is `mil_bag_size` random training patches' centre-token features; it is positive when at least one
    patch is tumour (bags are built half positive, with 1..3 tumour patches, so the head must find few positive
    cells among many). Only training data is used. The cell head is not touched.
    """
    idx = stratified_subset(train.labels, min(cfg.mil_patches, len(train)), cfg.seed + 1)
    sub = train.subset(idx)
    feats, labels = centre_features(model, sub, progress=progress), sub.labels
    rng = np.random.default_rng(cfg.seed + 2)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    bags, ys = [], []
    for b in range(cfg.mil_bags):
        k = int(rng.integers(1, 4)) if b % 2 == 0 and len(pos) else 0
        members = np.concatenate([rng.choice(pos, k), rng.choice(neg, cfg.mil_bag_size - k)])
        bags.append(members)
        ys.append(float(k > 0))
    x = feats[torch.as_tensor(np.stack(bags))]  # (bags, bag_size, F)
    y = torch.tensor(ys)
    mil = model.mil
    params = [p for n, p in mil.named_parameters() if not n.startswith("cell_head.")]
    opt = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    mil.train()
    steps = cfg.mil_steps
    for _ in range(steps):
        pick = torch.randint(0, len(x), (32,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(mil(x[pick]).slide_logit, y[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    mil.eval()
    with torch.no_grad():
        logits = mil(x).slide_logit
    auc = roc_auc_or_nan(y.numpy(), logits.numpy())
    if progress:
        print(f"MIL head on {cfg.mil_bags} synthetic training bags: train-bag AUC {auc:.4f}")
    return {"method": "synthetic bags of PCam training patches' centre-token features",
            "patches": len(sub), "bags": cfg.mil_bags, "bag_size": cfg.mil_bag_size, "steps": steps,
            "train_bag_auc": auc, "train_bag_loss": float(F.binary_cross_entropy_with_logits(logits, y))}
