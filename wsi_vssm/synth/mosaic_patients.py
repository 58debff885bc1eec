"""CAMELYON17-style patients whose five nodes are mosaic slides of real labelled patches (e.g. PCam).

The stages and node categories are those of `wsi_vssm.synth.patients` (`patient_plan`); each node is a mosaic
(`wsi_vssm.synth.mosaic`) of 96 px patches at the patches' resolution, its tissue a disc filling the grid, and a
positive node holds one lesion: a compact disc of label-1 patches whose diameter in patches puts it well inside
its category at 0.97 um/px (a patch is about 93 um):

| category | lesion diameter, patches | mm at 0.97 um/px |
|---|---|---|
| itc | 1 | 0.09 |
| micro | 4 to 14 | 0.37 to 1.30 |
| macro | 26 to 29 | 2.42 to 2.70 |

Macro nodes are `MACRO_GRID` patches a side, the others `GRID`. A lesion of 26+ patches across needs 500+
label-1 patches, so patches are reused (each placement under a random flip or quarter turn) when the pool is
smaller than a slide. Written into OUT: `patient_PPP_node_K.tif`, `patients.csv` and `reference.csv` (as
`wsi-vssm synth --patients`), and `mosaic.json` (every node's layout). No annotations: a PCam label covers the
centre of a patch only, so a mosaic lesion's outline is known to a patch, not to a micrometre.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from wsi_vssm.synth.cohort import SynthError, atomic_write_bytes, refuse_another_cohort
from wsi_vssm.synth.mosaic import random_dihedral, render_mosaic, write_image_slide
from wsi_vssm.synth.patients import NodeRecord, node_name, node_seed, patient_plan, patients_csv, reference_csv

GRID, MACRO_GRID = 18, 34
LESION_PATCHES = {"itc": (1, 1), "micro": (4, 14), "macro": (26, 29)}


def _disc(grid: int, centre: tuple[float, float], diameter: float) -> np.ndarray:
    yy, xx = np.mgrid[0:grid, 0:grid] + 0.5
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= (diameter / 2) ** 2


def plan_node(category: str, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(grid, grid) pool indices (-1: glass) of one node and its lesion's diameter in patches (0: none)."""
    grid = MACRO_GRID if category == "macro" else GRID
    tissue = _disc(grid, (grid / 2, grid / 2), grid - 1)
    lesion = np.zeros_like(tissue)
    diameter = 0
    if category != "negative":
        lo, hi = LESION_PATCHES[category]
        diameter = int(rng.integers(lo, hi + 1))
        room = (grid - 1 - diameter) / 2  # keep the lesion inside the tissue disc
        r, a = rng.uniform(0, max(0.0, room) * 0.9), rng.uniform(0, 2 * np.pi)
        centre = (grid / 2 + r * np.sin(a), grid / 2 + r * np.cos(a))
        lesion = _disc(grid, centre, diameter) & tissue if diameter > 1 else _one_cell(grid, centre)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if not len(neg) or (lesion.any() and not len(pos)):
        raise SynthError("mosaic patients need label-0 and label-1 patches")
    index = np.full((grid, grid), -1, np.int64)
    normal = tissue & ~lesion
    index[normal] = rng.choice(neg, int(normal.sum()), replace=len(neg) < normal.sum())
    if lesion.any():
        index[lesion] = rng.choice(pos, int(lesion.sum()), replace=len(pos) < lesion.sum())
    return index, diameter


def _one_cell(grid: int, centre: tuple[float, float]) -> np.ndarray:
    out = np.zeros((grid, grid), bool)
    out[int(centre[0]), int(centre[1])] = True
    return out


def make_mosaic_patient_cohort(out: str | os.PathLike, patches, n_patients: int, seed: int = 0,
                               mpp: float = 0.97, quality: int = 90) -> list[NodeRecord]:
    """Write `n_patients` x 5 mosaic node slides from `patches` (a PatchDataset of 96 px, labels 0/1)."""
    plan = patient_plan(n_patients, seed)
    labels = np.asarray(patches.labels)
    px = int(patches[0][0].shape[0])
    out = Path(out)
    refuse_another_cohort(out, [node_name(i, k) for i, p in enumerate(plan) for k in range(len(p.categories))])
    out.mkdir(parents=True, exist_ok=True)
    records, layouts = [], []
    for i, p in enumerate(plan):
        for node, category in enumerate(p.categories):
            name = node_name(i, node)
            rng = np.random.default_rng(node_seed(seed, i, node))
            index, diameter = plan_node(category, labels, rng)
            img = render_mosaic(index, lambda k, r=rng: random_dihedral(patches[k][0], r), px)
            path = out / f"{name}.tif"
            write_image_slide(path, img, mpp, f"wsi-vssm mosaic patient node; category={category}; mpp={mpp}",
                              quality)
            mm = (diameter * px * mpp / 1000.0,) if diameter else ()
            records.append(NodeRecord(name, p.patient, category, path, [], mm))
            layouts.append({"slide": name, "patient": p.patient, "stage": p.stage, "category": category,
                            "lesion_diameter_patches": diameter, "index": index.tolist()})
    atomic_write_bytes(out / "mosaic.json", json.dumps({"source": str(getattr(patches, "source", "")),
                                                        "seed": int(seed), "mpp": mpp, "patch_px": px,
                                                        "nodes": layouts}).encode())
    atomic_write_bytes(out / "patients.csv", patients_csv(records).encode())
    atomic_write_bytes(out / "reference.csv", reference_csv(records).encode())
    return records
