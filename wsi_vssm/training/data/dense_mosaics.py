"""Dense token labels for patches and mosaics of patches (the "dense" training stage).

PCam labels only the centre 32 px of a 96 px patch, which is the centre token of its 3 x 3 token map. Dense
supervision labels every token it can:
- a label-0 patch: all nine tokens are negative; the eight rim tokens weigh `rim_weight` (the label does not
  cover them, but the rim of a negative patch is normal in the great majority of cases);
- a label-1 patch: the centre token is positive, its rim is ignored (weight 0; tumour may stop anywhere);
- a background cell (white glass around the tissue): negative, weight `background_weight`.

Training mosaics vary in side, hold tissue inside a random outline with glass around it, and half of them hold a
connected lesion of label-1 patches from one patch up (`wsi_vssm.synth.mosaic.plan_mosaic`), so seams, edges and
tiny lesions are all labelled. Negative cells can be drawn from a pool of mined hard negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenWeights:
    rim: float = 0.5  # rim tokens of label-0 patches
    background: float = 0.25  # glass cells


def patch_token_targets(labels: np.ndarray, w: TokenWeights) -> tuple[np.ndarray, np.ndarray]:
    """(B,) patch labels -> (B, 3, 3) targets and weights of each patch's token map (96 px at stride 32)."""
    labels = np.asarray(labels)
    b = len(labels)
    target = np.zeros((b, 3, 3), np.float32)
    weight = np.full((b, 3, 3), w.rim, np.float32)
    weight[:, 1, 1] = 1.0
    pos = labels == 1
    target[pos, 1, 1] = 1.0
    weight[pos] = 0.0
    weight[pos, 1, 1] = 1.0
    return target, weight


def mosaic_token_targets(index: np.ndarray, labels: np.ndarray, w: TokenWeights) -> tuple[np.ndarray, np.ndarray]:
    """(g, g) pool indices (-1: glass) and the pool's labels -> (3g, 3g) token targets and weights."""
    g = index.shape[0]
    cell_label = np.where(index >= 0, np.asarray(labels)[np.maximum(index, 0)], -1)
    t, wt = patch_token_targets(np.maximum(cell_label, 0).reshape(-1), w)
    glass = cell_label.reshape(-1) < 0
    wt[glass] = w.background
    t[glass] = 0.0

    def as_map(a):
        return a.reshape(g, g, 3, 3).transpose(0, 2, 1, 3).reshape(3 * g, 3 * g)

    return as_map(t), as_map(wt)


class DenseMosaics:
    """Draws training mosaics of a PatchDataset. `hard` (pool indices of mined negatives) and `hard_share` make
    that share of the negative cells hard ones."""

    def __init__(self, patches, grid: tuple[int, int], max_lesion_frac: float, weights: TokenWeights):
        self.patches, self.grid, self.max_lesion_frac, self.weights = patches, grid, max_lesion_frac, weights
        self.labels = np.asarray(patches.labels)
        self.hard: np.ndarray | None = None
        self.hard_share = 0.0

    def draw(self, rng: np.random.Generator, side: int, tumour: bool):
        """One mosaic: (image (S, S, 3) uint8, targets (3g, 3g), weights (3g, 3g))."""
        from wsi_vssm.synth.mosaic import plan_mosaic, random_dihedral, render_mosaic

        index, _ = plan_mosaic(self.labels, side, tumour, rng, self.max_lesion_frac)
        if self.hard is not None and len(self.hard) and self.hard_share > 0:
            neg = (index >= 0) & (self.labels[np.maximum(index, 0)] == 0)
            swap = neg & (rng.random(index.shape) < self.hard_share)
            index[swap] = rng.choice(self.hard, int(swap.sum()))
        px = self.patches[0][0].shape[0]
        img = render_mosaic(index, lambda i: random_dihedral(self.patches[i][0], rng), px)
        t, w = mosaic_token_targets(index, self.labels, self.weights)
        return np.ascontiguousarray(img), t, w

    def batch(self, rng: np.random.Generator, cells: int):
        """Mosaics of one drawn side, about `cells` patch cells in all, half with a lesion (on average):
        ((B, 3, S, S) uint8, (B, 3g, 3g) targets, (B, 3g, 3g) weights)."""
        side = int(rng.integers(self.grid[0], self.grid[1] + 1))
        n = max(1, cells // (side * side))
        items = [self.draw(rng, side, bool(rng.random() < 0.5)) for _ in range(n)]
        imgs = np.stack([i[0] for i in items]).transpose(0, 3, 1, 2)
        return imgs, np.stack([i[1] for i in items]), np.stack([i[2] for i in items])
