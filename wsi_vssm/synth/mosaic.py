"""Mosaic cohorts: slides tiled from labelled real patches (e.g. PatchCamelyon), for training and testing the
slide-level (MIL) head on real tissue when no labelled whole-slide cohort is at hand.

Each slide is a `grid` x `grid` mosaic of patches inside a random elliptical tissue outline (white around it);
with `grid` = (low, high) each slide draws its own side from that range, so bags of cells vary in size as
slides do.
A normal slide holds only label-0 patches. A tumour slide holds one connected "lesion" of label-1 patches, grown
cell by cell from a random seed cell, with a size drawn log-uniformly from one patch to `max_lesion_frac` of the
tissue, so that single-patch micro-metastases are as common per decade of size as large ones. Patches are drawn
without replacement within a slide (a patch may recur across slides when the pool is small); with `reuse`, a
slide larger than the pool draws with replacement and places every patch under a random flip or quarter turn.
The slides are pyramidal JPEG TIFFs at the patches' resolution, with `reference.csv` (CAMELYON16 style) and
`mosaic.json` (every slide's layout: which patch went where, which cells are lesion), written atomically.

Seams between patches are artificial, and a label-1 patch is tumour in its centre 32 px only (PCam's rule), so
the lesion's outline is approximate: treat these cohorts as a test of slide-level aggregation on real tissue, not
as whole slides.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_vssm.synth.cohort import SynthError, atomic_write_bytes, refuse_another_cohort, write_pyramid_atomic

BACKGROUND = 243  # the white of an empty glass slide, as scanners record it
MIN_GRID, MAX_GRID = 3, 64


@dataclass(frozen=True)
class MosaicSlide:
    name: str
    label: str  # 'tumor' or 'normal'
    path: Path
    tissue_cells: int
    lesion_cells: list[tuple[int, int]]  # (row, col) grid cells holding label-1 patches
    patches: list[list[str | None]]  # grid of source patch names (None: background)


def tile(patches: list[np.ndarray], grid: int) -> np.ndarray:
    """grid * grid (p, p, 3) patches, row by row -> one (grid * p, grid * p, 3) image."""
    p = patches[0].shape[0]
    return np.stack(patches).reshape(grid, grid, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(grid * p, grid * p, 3)


def _tissue_cells(rng: np.random.Generator, grid: int) -> np.ndarray:
    """(grid, grid) bool: a random ellipse of cells, at least half the grid."""
    yy, xx = np.mgrid[0:grid, 0:grid] + 0.5
    while True:
        cy, cx = rng.uniform(0.4, 0.6, 2) * grid
        ry, rx = rng.uniform(0.35, 0.6, 2) * grid
        theta = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / rx
        v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / ry
        mask = u * u + v * v <= 1.0
        if mask.sum() >= max(2, grid * grid // 2):
            return mask


def _grow_lesion(rng: np.random.Generator, tissue: np.ndarray, size: int) -> list[tuple[int, int]]:
    """A connected set of `size` tissue cells (4-neighbours), grown from a random seed by random frontier picks."""
    cells = [tuple(c) for c in np.argwhere(tissue)]
    start = cells[int(rng.integers(len(cells)))]
    lesion, frontier = {start}, {start}
    while len(lesion) < size and frontier:
        r, c = sorted(frontier)[int(rng.integers(len(frontier)))]
        nbrs = [(r + dr, c + dc) for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        free = [
            n
            for n in nbrs
            if 0 <= n[0] < tissue.shape[0] and 0 <= n[1] < tissue.shape[1] and tissue[n] and n not in lesion
        ]
        if not free:
            frontier.discard((r, c))
            continue
        n = free[int(rng.integers(len(free)))]
        lesion.add(n)
        frontier.add(n)
    return sorted(lesion)


def plan_mosaic(
    labels: np.ndarray, grid: int, tumor: bool, rng: np.random.Generator, max_lesion_frac: float = 0.3,
    reuse: bool = False,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(grid, grid) indices into the patch pool (-1: background) and the lesion cells of one slide. `reuse`:
    draw with replacement when a class has fewer patches than the slide needs."""
    tissue = _tissue_cells(rng, grid)
    n_tissue = int(tissue.sum())
    lesion: list[tuple[int, int]] = []
    if tumor:
        top = max(1.0, max_lesion_frac * n_tissue)
        size = int(round(np.exp(rng.uniform(0.0, np.log(top)))))
        lesion = _grow_lesion(rng, tissue, max(1, size))
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    is_lesion = np.zeros_like(tissue)
    for rc in lesion:
        is_lesion[rc] = True
    need_neg = int((tissue & ~is_lesion).sum())
    short_pos, short_neg = len(pos) < len(lesion), len(neg) < need_neg
    if (short_pos and not len(pos)) or (short_neg and not len(neg)) or (not reuse and (short_pos or short_neg)):
        raise SynthError(
            f"the patch pool is too small for a {grid} x {grid} mosaic "
            f"({len(neg)} label-0 and {len(pos)} label-1 patches)"
        )
    index = np.full((grid, grid), -1, np.int64)
    index[tissue & ~is_lesion] = rng.choice(neg, need_neg, replace=short_neg)
    if lesion:
        index[is_lesion] = rng.choice(pos, len(lesion), replace=short_pos)
    return index, lesion


def render_mosaic(index: np.ndarray, patch: Callable[[int], np.ndarray], patch_px: int) -> np.ndarray:
    """The (grid * patch_px)^2 RGB image of a mosaic plan; `patch(i)` gives pool patch i as (p, p, 3) uint8."""
    glass = np.full((patch_px, patch_px, 3), BACKGROUND, np.uint8)
    tiles = []
    for i in index.reshape(-1):
        p = glass if i < 0 else patch(int(i))
        if p.shape != (patch_px, patch_px, 3):
            raise SynthError(f"patch {i} is {p.shape[1]} x {p.shape[0]} px, expected {patch_px} x {patch_px}")
        tiles.append(p)
    return tile(tiles, index.shape[0])


def write_image_slide(
    path: str | os.PathLike, img: np.ndarray, mpp: float, description: str = "", quality: int = 90
) -> None:
    """Write an RGB image as a pyramidal JPEG TIFF (OpenSlide 'generic-tiff'), atomically."""
    from wsi_vssm.synth.writer import TILE

    h, w = img.shape[:2]

    def read_tile(x0: int, y0: int) -> np.ndarray:
        out = np.full((TILE, TILE, 3), BACKGROUND, np.uint8)
        part = img[y0 : y0 + TILE, x0 : x0 + TILE]
        out[: part.shape[0], : part.shape[1]] = part
        return out

    write_pyramid_atomic(path, (w, h), read_tile, mpp, workers=1, quality=quality, description=description)


def make_mosaic_cohort(
    out: str | os.PathLike,
    patches,
    n_slides: int,
    seed: int = 0,
    grid: int | tuple[int, int] = 8,
    mpp: float = 0.97,
    *,
    max_lesion_frac: float = 0.3,
    quality: int = 90,
    prefix: str = "",
    on_slide: Callable[[MosaicSlide], None] | None = None,
    reuse: bool = False,
) -> list[MosaicSlide]:
    """Write `n_slides` mosaic slides (half, rounded down, tumour) from `patches` (a PatchDataset, labels 0/1)
    into `out`, with reference.csv and mosaic.json. Same patches and seed, same files. `reuse`: slides larger
    than the pool reuse patches, each placed under a random flip or quarter turn."""
    from wsi_vssm.synth.cohort import cohort_plan

    if not isinstance(n_slides, (int, np.integer)) or n_slides < 1:
        raise SynthError(f"number of slides must be at least 1, got {n_slides!r}")
    low, high = _grid_range(grid)
    if not 0 < max_lesion_frac <= 1:
        raise SynthError(f"max_lesion_frac must be in (0, 1], got {max_lesion_frac!r}")
    if not (isinstance(mpp, (int, float)) and 0.05 <= mpp <= 20):
        raise SynthError(f"mpp must be between 0.05 and 20 um per px, got {mpp!r}")
    if not 1 <= quality <= 100:
        raise SynthError(f"JPEG quality must be 1 to 100, got {quality}")
    if len(patches) == 0:
        raise SynthError("no patches to build mosaics from")
    labels = np.asarray(patches.labels)
    patch_px = int(patches[0][0].shape[0])
    out = Path(out)
    refuse_another_cohort(out, [prefix + name for name, _ in cohort_plan(n_slides)])
    _prepare_out(out)
    slides = []
    for name, label in cohort_plan(n_slides):
        name = prefix + name
        rng = np.random.default_rng([int(seed), label == "tumor", int(name.rsplit("_", 1)[1])])
        side = low if low == high else int(rng.integers(low, high + 1))
        index, lesion = plan_mosaic(labels, side, label == "tumor", rng, max_lesion_frac, reuse)
        place = (lambda i, r=rng: random_dihedral(patches[i][0], r)) if reuse else (lambda i: patches[i][0])
        img = render_mosaic(index, place, patch_px)
        path = out / f"{name}.tif"
        write_image_slide(
            path, img, mpp, f"wsi-vssm mosaic of {getattr(patches, 'source', '')}; label={label}; mpp={mpp}", quality
        )
        names = [[None if i < 0 else _patch_name(patches, int(i)) for i in row] for row in index]
        rec = MosaicSlide(name, label, path, int((index >= 0).sum()), [tuple(map(int, c)) for c in lesion], names)
        slides.append(rec)
        if on_slide is not None:
            on_slide(rec)
    doc = {
        "source": str(getattr(patches, "source", "")),
        "seed": int(seed),
        "grid": low if low == high else [low, high],
        "patch_px": patch_px,
        "mpp": mpp,
        "max_lesion_frac": max_lesion_frac,
        "slides": [
            {
                "name": s.name,
                "label": s.label,
                "tissue_cells": s.tissue_cells,
                "lesion_cells": s.lesion_cells,
                "patches": s.patches,
            }
            for s in slides
        ],
    }
    atomic_write_bytes(out / "mosaic.json", json.dumps(doc, indent=1).encode())
    csv = "slide,label\n" + "".join(f"{s.name},{s.label}\n" for s in slides)
    atomic_write_bytes(out / "reference.csv", csv.encode())
    return slides


def slide_patches(layout: dict, label: str = "normal") -> dict[str, set[str]]:
    """{slide name: the distinct source patches it holds} for the slides of `label` in a cohort's mosaic.json
    (as `make_mosaic_cohort` writes it: rows of patch names, None for glass). A layout of another shape (a
    patients cohort's pool indices, a flat list) raises KeyError or TypeError rather than giving wrong sets."""
    held = {}
    for s in layout["slides"]:
        if s["label"] != label:
            continue
        rows = s["patches"]
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise TypeError(f"mosaic slide {s['name']!r}: `patches` is not rows of patch names")
        names = {p for row in rows for p in row if p is not None}
        if not all(isinstance(p, str) for p in names):
            raise TypeError(f"mosaic slide {s['name']!r}: `patches` is not rows of patch names")
        held[s["name"]] = names
    return held


def patch_holders(held: dict[str, set[str]]) -> dict[str, set[str]]:
    """{patch: the slides that hold it}, from `slide_patches`."""
    holders: dict[str, set[str]] = {}
    for slide, names in held.items():
        for p in names:
            holders.setdefault(p, set()).add(slide)
    return holders


def patch_recurrence(held: dict[str, set[str]]) -> float | None:
    """How far slides share their patches: over the distinct patches of `held` (`slide_patches`), the median
    share of the OTHER slides that hold each one (0: no patch in two slides; 1: every slide holds every patch).
    None under two slides or without patches."""
    holders = patch_holders(held)
    if len(held) < 2 or not holders:
        return None
    shares = sorted((len(s) - 1) / (len(held) - 1) for s in holders.values())
    return shares[len(shares) // 2]


def random_dihedral(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of the 8 flips / quarter turns (PCam's centre label does not move)."""
    img = np.rot90(img, int(rng.integers(4)))
    return img[:, ::-1] if rng.integers(2) else img


def _grid_range(grid) -> tuple[int, int]:
    """(low, high) patches per side from an int or a (low, high) pair, checked."""
    pair = tuple(grid) if isinstance(grid, (tuple, list)) else (grid, grid)
    ok = len(pair) == 2 and all(isinstance(g, (int, np.integer)) and MIN_GRID <= g <= MAX_GRID for g in pair)
    if not ok or pair[0] > pair[1]:
        raise SynthError(
            f"mosaic grid must be {MIN_GRID} to {MAX_GRID} patches per side (or a low, high pair), got {grid!r}"
        )
    return int(pair[0]), int(pair[1])


def _patch_name(patches, i: int) -> str:
    items = getattr(patches, "items", None)
    return items[i].name if items is not None else str(i)


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SynthError(f"output {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SynthError(f"cannot create output folder {out}: {e.strerror or e}") from e
