"""Region crops of annotated slides, with a tumour label per stride-32 token, for cell-level training.

A crop is `crop_px` square at the model's mpp, on a grid over the slide, kept when its tissue fraction (thumbnail
mask) reaches `min_tissue`. Token (i, j) covers crop pixels [32 i, 32 i + 32) x [32 j, 32 j + 32) (one token per
`token_px` cell); its label is 1 when more than half of it lies in a lesion (`AnnotationSet.tumor`, exclusions
already cut out), and it counts in the loss only when it holds tissue and does not touch an excluded area.

Slides and annotations are paired by file stem: `DIR/**/name.{tif,svs,...}` with `name.xml` / `name.geojson`
beside it or under an `annotations/` folder (CAMELYON16 and `wsi-vssm synth` layout). A slide without an
annotation file is used only when `reference.csv` labels it normal (all its tokens are then negative).
Slides are opened lazily in each worker (paths are stored, never handles).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wsi_vssm.errors import UsageError

SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms")
NORMAL_LABELS = ("normal", "negative", "0")


@dataclass(frozen=True)
class CropSpec:
    slide: int  # index into the dataset's slide list
    x: float  # level-0 box
    y: float
    size0: float  # level-0 side (crop_px * mpp / slide mpp)


@dataclass
class AnnotatedSlide:
    slide: Path
    annotations: Path | None  # None: a normal slide (every token negative)


def find_annotated_slides(root: str | os.PathLike) -> list[AnnotatedSlide]:
    """Slides under `root` paired with their lesion annotations (see the module docstring)."""
    from wsi_vssm.io.annotations import annotation_file_names, annotation_key

    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"slides folder not found: {root}")
    files = sorted(root.rglob("*"))  # walked once
    keyed = {key: p for p in files if (key := annotation_key(p)) is not None}
    stems = {p.stem for p in files if p.suffix.lower() in SLIDE_SUFFIXES}
    anns = {stem: keyed[n] for stem in stems for n in reversed(annotation_file_names(stem)) if n in keyed}
    normal = _normal_names(root / "reference.csv")
    out = []
    for p in files:
        if p.suffix.lower() not in SLIDE_SUFFIXES or not p.is_file():
            continue
        if p.stem in anns:
            out.append(AnnotatedSlide(p, anns[p.stem]))
        elif p.stem in normal:
            out.append(AnnotatedSlide(p, None))
    return out


def _normal_names(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    with open(path, newline="", encoding="utf-8-sig") as f:  # as every table is read: UTF-8, Excel's BOM too
        rows = list(csv.DictReader(f))
    return {Path(r.get("slide", "")).stem for r in rows if str(r.get("label", "")).strip().lower() in NORMAL_LABELS}


class RegionCropDataset(torch.utils.data.Dataset):
    """Items -> (uint8 (S, S, 3) crop, float32 (h, w) token labels, bool (h, w) token mask), S = crop_px."""

    def __init__(self, slides: list[AnnotatedSlide], mpp: float = 0.97, token_px: int = 32, crop_px: int = 512,
                 min_tissue: float = 0.25, max_crops_per_slide: int = 64, seed: int = 0, slide_mpp=None):
        if crop_px % token_px or token_px % 32:
            raise UsageError(f"crop_px ({crop_px}) must be a multiple of token_px ({token_px}), itself of 32")
        self.slides, self.mpp, self.token_px, self.crop_px = slides, float(mpp), int(token_px), int(crop_px)
        self.min_tissue, self.slide_mpp = float(min_tissue), slide_mpp
        self._open: dict[int, tuple] = {}  # per-process cache: slide index -> (reader, annotations, mask, scale)
        self.crops = [c for i in range(len(slides)) for c in self._plan(i, max_crops_per_slide, seed)]
        self._open.clear()  # handles do not pickle: each worker opens its own

    @classmethod
    def from_folder(cls, root, **kwargs) -> RegionCropDataset:
        return cls(find_annotated_slides(root), **kwargs)

    def __len__(self) -> int:
        return len(self.crops)

    def _slide(self, i: int):
        if i not in self._open:
            from wsi_vssm.io.annotations import AnnotationSet, read_annotations
            from wsi_vssm.io.slide import open_slide
            from wsi_vssm.io.tissue import slide_tissue_mask

            s = self.slides[i]
            reader = open_slide(s.slide, mpp=self.slide_mpp)
            ann = read_annotations(s.annotations, slide=reader) if s.annotations else AnnotationSet.from_items([])
            mask, scale = slide_tissue_mask(reader)
            self._open[i] = (reader, ann, mask, scale)
        return self._open[i]

    def _plan(self, i: int, limit: int, seed: int) -> list[CropSpec]:
        """Grid crops with tissue; all that touch a lesion first, then a seeded draw of the rest, to `limit`."""
        from wsi_vssm.io.tissue import tissue_fraction

        reader, ann, mask, scale = self._slide(i)
        size0 = self.crop_px * self.mpp / reader.require_mpp()
        w0, h0 = reader.dimensions
        boxes = [(x, y) for y in np.arange(0, h0 - size0 + 1, size0) for x in np.arange(0, w0 - size0 + 1, size0)]
        keep = [b for b in boxes
                if tissue_fraction(mask, (b[0] / scale, b[1] / scale, size0 / scale, size0 / scale)) >= self.min_tissue]
        from shapely.geometry import box as shp_box

        lesion = [b for b in keep if ann.tumor.intersects(shp_box(b[0], b[1], b[0] + size0, b[1] + size0))]
        rest = [b for b in keep if b not in lesion]
        rng = np.random.default_rng([seed, i])
        rest = [rest[j] for j in rng.permutation(len(rest))]
        chosen = (lesion + rest)[:limit]
        return [CropSpec(i, float(x), float(y), float(size0)) for x, y in chosen]

    def __getitem__(self, k: int):
        c = self.crops[k]
        reader, ann, mask, scale = self._slide(c.slide)
        rgb = reader.read(c.x, c.y, c.size0, c.size0, self.mpp)
        rgb = _fit(rgb, self.crop_px)
        labels, valid = self.token_labels(c, ann, mask, scale)
        return rgb, labels, valid

    def token_labels(self, c: CropSpec, ann, mask: np.ndarray, scale: float):
        """(h, w) float labels (lesion fraction > 0.5) and (h, w) bool mask (tissue, no excluded area)."""
        n = self.crop_px // self.token_px
        d = c.size0 / self.crop_px  # level-0 px per crop px
        box = (c.x, c.y, c.size0, c.size0)
        lesion = _block_mean(ann.mask(box, downsample=d, which="tumor"), self.crop_px, n)
        excluded = _block_mean(ann.mask(box, downsample=d, which="excluded"), self.crop_px, n)
        # tissue per token: the thumbnail mask at each token's centre
        centres = (np.arange(n) + 0.5) * self.token_px * d
        ys = np.clip(((c.y + centres) / scale).astype(int), 0, mask.shape[0] - 1)
        xs = np.clip(((c.x + centres) / scale).astype(int), 0, mask.shape[1] - 1)
        tissue = mask[np.ix_(ys, xs)]
        return (lesion > 0.5).astype(np.float32), tissue & (excluded == 0)


def _block_mean(m: np.ndarray, size: int, n: int) -> np.ndarray:
    m = _fit(m[..., None], size)[..., 0].astype(np.float32)
    return m.reshape(n, size // n, n, size // n).mean(axis=(1, 3))


def _fit(a: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad the first two axes to size x size (reads may differ by a pixel from rounding)."""
    out = np.zeros((size, size, *a.shape[2:]), dtype=a.dtype)
    h, w = min(size, a.shape[0]), min(size, a.shape[1])
    out[:h, :w] = a[:h, :w]
    return out


def collate_regions(batch):
    """[(crop, labels, mask)] -> (B, 3, S, S) uint8, (B, h, w) float32, (B, h, w) bool."""
    x = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.stack([b[1] for b in batch])), torch.from_numpy(np.stack([b[2] for b in batch]))
