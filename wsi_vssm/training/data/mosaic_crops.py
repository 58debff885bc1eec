"""Mosaic crops: `grid` x `grid` labelled patches tiled into one training image, so the cell head learns its
labels with the context it meets on slides (long SS2D scans over a large token map, neighbouring tissue) rather
than only on isolated 96 px patches, where the token map is 3 x 3.

Each item is (crop (S, S, 3) uint8, labels (h, w) float32, mask (h, w) bool) as for annotated-slide region crops
(`wsi_vssm.training.data.region_crops.collate_regions` batches them): a patch's label goes to its centre token (PCam's
labelled 32 px) and only those tokens are in the loss. Each patch is flipped/turned at random before tiling
(label-preserving; the whole mosaic is not, as its labels would move).
"""

from __future__ import annotations

import numpy as np

from wsi_vssm.errors import UsageError
from wsi_vssm.synth.mosaic import tile  # the one tiling rule: mosaic slides and mosaic crops agree

TOKEN_PX = 32


def centre_token_grid(labels: np.ndarray, grid: int, patch_px: int) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) token labels and mask for a mosaic whose patch (r, c) has label labels[r * grid + c]."""
    per = patch_px // TOKEN_PX
    h = grid * per
    lab, mask = np.zeros((h, h), np.float32), np.zeros((h, h), bool)
    lab[per // 2::per, per // 2::per] = np.asarray(labels, np.float32).reshape(grid, grid)
    mask[per // 2::per, per // 2::per] = True
    return lab, mask


class MosaicCrops:
    """Random mosaics of a PatchDataset's patches. `len` is one pass over the patches in mosaics; every
    `__getitem__` call draws a fresh seeded mosaic (the index only seeds it, with the counter `calls`), so
    repeated passes see new arrangements. A resumed training run restores `calls` from its checkpoint, so that
    it draws the mosaics the uninterrupted run would."""

    def __init__(self, patches, grid: int, seed: int = 0):
        if not isinstance(grid, int) or grid < 2:
            raise UsageError(f"mosaic grid must be an integer >= 2, got {grid!r}")
        if len(patches) < grid * grid:
            raise UsageError(f"{grid} x {grid} mosaics need at least {grid * grid} patches, got {len(patches)}")
        self.patches, self.grid, self.seed, self.calls = patches, grid, seed, 0
        px = patches[0][0].shape[0]
        if px % TOKEN_PX or (px // TOKEN_PX) % 2 == 0:
            raise UsageError(f"mosaic crops need patches of an odd number of {TOKEN_PX} px tokens, got {px} px")

    def __len__(self) -> int:
        return max(1, len(self.patches) // (self.grid * self.grid))

    def __getitem__(self, k: int):
        self.calls += 1
        rng = np.random.default_rng([self.seed, int(k), self.calls])
        idx = rng.choice(len(self.patches), self.grid * self.grid, replace=False)
        imgs, labels = [], []
        for i in idx:
            img, y = self.patches[int(i)]
            img = np.rot90(img, int(rng.integers(4)))
            imgs.append(img[:, ::-1] if rng.integers(2) else img)
            labels.append(y)
        crop = np.ascontiguousarray(tile(imgs, self.grid))
        lab, mask = centre_token_grid(np.array(labels), self.grid, crop.shape[0] // self.grid)
        return crop, lab, mask
