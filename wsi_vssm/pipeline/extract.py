"""Slide -> token-cell features (`CellFeatures`), in memory or written to a `FeatureStore`.

    regions (RegionGrid at the analysis mpp, overlapping by `overlap_px`)
      -> each region cropped to its whole cells inside the slide (no padding pixel reaches the backbone)
      -> VSSM.forward_features: stride-32 map (B, F, h, w)
      -> average-pooled to cells of `token_px` (one stride-32 token per cell for the default model)
      -> each cell kept only from the region that "owns" it (the one where it lies farthest from an edge)
      -> cells whose tissue fraction (thumbnail mask, area-resampled to the cell grid) < `min_tissue` dropped

Cells sit on one global grid aligned to the slide's top-left corner at the analysis resolution, so a cell's
coordinates never depend on the region layout. `extract_slide` does no file I/O (predict calls it too);
`extract_to_store` writes its result atomically. The store is `pipeline.store`, the geometry `pipeline.geometry`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from wsi_vssm import __version__
from wsi_vssm.errors import UsageError
from wsi_vssm.io.base import SlideReader
from wsi_vssm.models.device import resolve_device
from wsi_vssm.models.inputs import IMAGE_MEAN, IMAGE_STD, STRIDE, to_tensor
from wsi_vssm.models.model_file import DEFAULT_TOKEN_PX, BackboneInfo, state_dict_hash
from wsi_vssm.pipeline.geometry import (
    DEFAULT_MIN_TISSUE,
    cell_tissue_map,
    check_enlargement,
    check_geometry,
    owned_range,
    resolve_geometry,
)
from wsi_vssm.pipeline.store import STORE_FORMAT, CellFeatures, FeatureStore, FeatureStoreError


# ---- extraction -------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Everything `_cells_of_region` needs that is the same for every region of a slide."""

    token_px: int
    region_cells: int
    step_cells: int
    overlap_cells: int
    grid_shape: tuple[int, int]  # regions (rows, cols)
    cell_grid: tuple[int, int]  # whole cells inside the slide (rows, cols)
    tissue: np.ndarray  # (cell rows, cell cols) float32
    min_tissue: float


@dataclass
class SlidePlan:
    """What one slide's extraction needs besides the pixels and the model, computed once (`plan_slide`): the
    region grid (tissue regions), the cell plan, the store attrs and the device. Plain data (no open handle), so
    a distributed run ships it to the processes that run `extract_regions` on parts of the grid."""

    grid: object  # wsi_vssm.io.regions.RegionGrid
    plan: _Plan
    attrs: dict
    slide_mpp: float
    device: str

    def __len__(self) -> int:
        return len(self.grid)


def plan_slide(
    slide,
    backbone,
    mpp: float,
    token_px: int = DEFAULT_TOKEN_PX,
    region_px: int | None = None,
    overlap_px: int | None = None,
    device: str = "cpu",
    min_tissue: float = DEFAULT_MIN_TISSUE,
    info: BackboneInfo | None = None,
    tissue: tuple[np.ndarray, float] | None = None,
) -> SlidePlan:
    """The tissue mask (unless given), region grid and cell plan of an open slide; see `extract_slide`."""
    from wsi_vssm.io.regions import NoTissueWarning, RegionGrid

    dev = resolve_device(device)
    region_px, overlap_px = resolve_geometry(dev, token_px, region_px, overlap_px)
    check_geometry(token_px, region_px, overlap_px, min_tissue)
    slide_mpp = slide.require_mpp()
    check_enlargement(slide, mpp)
    if tissue is None:
        from wsi_vssm.io.tissue import slide_tissue_mask

        tissue = slide_tissue_mask(slide)
    mask, mask_scale = tissue
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoTissueWarning)  # no tissue is not an error: the slide has no cells
        grid = RegionGrid(slide, mpp, region_px, overlap_px, min_tissue=0.0, tissue=(mask, mask_scale))
    plan = _make_plan(slide, grid, token_px, mask, mask_scale, min_tissue)
    attrs = _attrs(slide, grid, token_px, min_tissue, info, backbone)
    return SlidePlan(grid, plan, attrs, float(slide_mpp), dev)



@dataclass(frozen=True)
class Inference:
    """How regions go through the backbone: numeric precision and test-time augmentation.

    `precision`: fp32, bf16 or auto (`models.precision`: bf16 only where the hardware has it; a bf16 request
    on hardware without it runs fp32 with one warning). `tta`: the feature map is the mean over the 8 flips and
    quarter turns of each region (each view's map turned back), at 8 times the backbone's cost.
    """

    precision: str = "fp32"
    tta: bool = False

    @classmethod
    def of(cls, inference: Inference | None, amp: bool = False) -> Inference:
        """`inference`, or the default; the old `amp=True` flag means bf16."""
        inference = inference or cls()
        return cls("bf16", inference.tta) if amp and inference.precision == "fp32" else inference


def extract_regions(
    slide,
    backbone,
    plan: SlidePlan,
    region_indices=None,
    batch_size: int = 1,
    workers: int = 2,
    amp: bool = False,
    progress: Callable[[int, int], None] | None = None,
    inference: Inference | None = None,
) -> list[tuple]:
    """The cells owned by the plan's regions `region_indices` (default: all), as per-region tuples
    (features, global cell rows, cols, tissue, region index, untransformed-view features or None) for
    `assemble_cells`. Any split of the regions
    into calls gives the same cells as one call (batches of `batch_size` form within a call)."""
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    grid = plan.grid
    regions = list(grid) if region_indices is None else [grid[int(i)] for i in region_indices]
    dev = plan.device
    return _run_regions(slide, regions, grid.mpp, backbone.to(dev).eval(), plan.plan, batch_size, workers, dev,
                        Inference.of(inference, amp), progress)


def assemble_cells(plan: SlidePlan, parts: list[tuple], backbone) -> CellFeatures:
    """The slide's CellFeatures from the parts of all its regions (in any order); NaN/inf features raise."""
    attrs = plan.attrs
    cells = _assemble(parts, plan.plan, plan.grid.scale, plan.slide_mpp, attrs, backbone)
    bad = int((~np.isfinite(cells.features)).any(axis=1).sum())
    if bad:  # NaN weights, or values beyond float16: never stored or scored as if they were features
        raise FeatureStoreError(f"{attrs['slide_path'] or attrs['slide']}: {bad} of {len(cells)} cells have "
                                f"NaN/inf features (model {attrs['model_id']}: check its weights)")
    return cells


def extract_slide(
    slide,
    backbone,
    mpp: float,
    token_px: int = DEFAULT_TOKEN_PX,
    region_px: int | None = None,
    overlap_px: int | None = None,
    batch_size: int = 1,
    workers: int = 2,
    device: str = "cpu",
    amp: bool = False,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    progress: Callable[[int, int], None] | None = None,
    info: BackboneInfo | None = None,
    tissue: tuple[np.ndarray, float] | None = None,
    run_regions: Callable[[SlidePlan], list[tuple]] | None = None,
    inference: Inference | None = None,
) -> CellFeatures:
    """The token-cell features of an open slide at analysis resolution `mpp` (no file I/O besides reading).

    `backbone` is a VSSM (its `forward_features` is used); `info` (from `load_backbone`) goes into the attrs.
    `region_px` and `overlap_px` default as `pipeline.geometry.resolve_geometry` says; `progress(done, total)`
    is called per region.
    `tissue` = (mask, level-0 px per mask px) overrides the thumbnail tissue mask. `inference` sets the
    precision and test-time augmentation (`Inference`; `amp=True` is the old spelling of bf16).
    `run_regions(plan)`, when given, returns the parts of all the plan's regions instead of `extract_regions`
    in this process (the cohort runner spreads a large slide's regions over a Dask cluster with it).
    Raises MissingMpp when the slide has no resolution, UsageError on bad arguments.
    """
    if not isinstance(slide, SlideReader):
        raise UsageError(f"extract_slide takes an open slide (wsi_vssm.io.open_slide(path), or ArraySlide for an "
                         f"image in memory), got a {type(slide).__name__}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    # plan_slide resolves the device and region size and checks the geometry
    plan = plan_slide(slide, backbone, mpp, token_px=token_px, region_px=region_px, overlap_px=overlap_px,
                      device=device, min_tissue=min_tissue, info=info, tissue=tissue)
    if run_regions is None:
        parts = extract_regions(slide, backbone, plan, batch_size=batch_size, workers=workers,
                                progress=progress, inference=Inference.of(inference, amp))
    else:
        parts = run_regions(plan)
    return assemble_cells(plan, parts, backbone)


def _run_regions(slide, regions, mpp, backbone, plan, batch_size, workers, dev, inference: Inference,
                 progress) -> list[tuple]:
    """Stream `regions` through the backbone in batches of equal shape; per-region cell tuples."""
    import torch

    from wsi_vssm.io.regions import RegionStream

    parts: list[tuple] = []
    total, done = len(regions), 0
    if progress is not None:
        progress(0, total)
    with RegionStream(_source(slide), regions, mpp=mpp, workers=workers) as stream, torch.inference_mode():
        batch: list[tuple] = []
        for region, img in stream:
            item = _crop(region, img, plan)
            if item is None:
                done += 1
                continue
            if batch and (len(batch) >= batch_size or batch[0][1].shape != item[1].shape):
                parts += _run_batch(batch, backbone, plan, dev, inference)
                done += len(batch)
                batch = []
                if progress is not None:
                    progress(done, total)
            batch.append(item)
        if batch:
            parts += _run_batch(batch, backbone, plan, dev, inference)
    if progress is not None:
        progress(total, total)
    return parts


def _source(slide):
    """Per-worker readers for file slides (tifffile/zarr handles are not thread-safe); the slide itself else."""
    if slide.path is None or slide.backend not in ("openslide", "tifffile", "zarr"):
        return slide
    from wsi_vssm.io.slide import reopen_slide

    return lambda: reopen_slide(slide)


def _make_plan(slide, grid, token_px: int, mask, mask_scale: float, min_tissue: float) -> _Plan:
    w0, h0 = slide.dimensions
    cell_px0 = token_px * grid.scale
    # Only whole cells inside the slide: a partial cell at the right/bottom edge would see padding.
    cell_grid = (math.floor(h0 / cell_px0 + 1e-9), math.floor(w0 / cell_px0 + 1e-9))
    return _Plan(
        token_px=token_px,
        region_cells=grid.region_px // token_px,
        step_cells=(grid.region_px - grid.overlap_px) // token_px,
        overlap_cells=grid.overlap_px // token_px,
        grid_shape=grid.shape,
        cell_grid=cell_grid,
        tissue=cell_tissue_map(mask, mask_scale, cell_px0, cell_grid),
        min_tissue=min_tissue,
    )


def _crop(region, img: np.ndarray, plan: _Plan):
    """(region, image cropped to its whole cells inside the slide, cell box) or None when it has no such cell.

    The crop follows the global cell grid (whole cells inside the slide), so no padded pixel reaches the
    backbone (up to the sub-pixel rounding of the region's level-0 origin) and every inside cell is covered.
    """
    t = plan.token_px
    h_cells = min(plan.region_cells, plan.cell_grid[0] - region.row * plan.step_cells, img.shape[0] // t)
    w_cells = min(plan.region_cells, plan.cell_grid[1] - region.col * plan.step_cells, img.shape[1] // t)
    if w_cells <= 0 or h_cells <= 0:
        return None
    crop = img[: h_cells * t, : w_cells * t]  # regions start inside the slide: padding lies right and below
    return region, to_tensor(crop), (h_cells, w_cells)


def _run_batch(batch: list[tuple], backbone, plan: _Plan, device: str, inference: Inference) -> list[tuple]:
    import torch
    import torch.nn.functional as F

    from wsi_vssm.models.precision import autocast, resolve_precision

    x = torch.cat([b[1] for b in batch]).to(device, non_blocking=True)  # (B, 3, H, W)
    with autocast(resolve_precision(inference.precision, device), device):
        fmap, view = region_maps(backbone, x, inference.tta)  # (B, F, H/32, W/32) float32 each
    k = plan.token_px // STRIDE
    maps = [m if k == 1 else F.avg_pool2d(m.float(), k, k) for m in (fmap, view) if m is not None]
    maps = [m.float().cpu().numpy() for m in maps]  # (B, F, H/token_px, W/token_px) each
    return [_cells_of_region(region, maps[0][i], plan, maps[1][i] if len(maps) > 1 else None)
            for i, (region, _, _) in enumerate(batch)]


def region_features(backbone, x, tta: bool):
    """The stride-32 feature map of x (B, 3, H, W); with `tta`, the mean over the 8 dihedral views, each view's
    map turned back to x's orientation (H and W swap under a quarter turn and swap back)."""
    return region_maps(backbone, x, tta)[0]


def region_maps(backbone, x, tta: bool):
    """(`region_features`, the untransformed view's map when `tta` else None). The domain check reads the
    latter: its distance threshold was set on single views, and a mean of 8 views lies nearer the training mean
    (with r5's weights, before 2026-12-04, the skin sample measured in domain under --tta, out of it without)."""
    import torch

    first = backbone.forward_features(x).float()
    if not tta:
        return first, None
    total = first.clone()
    for flip in (False, True):
        v = x.flip(-1) if flip else x
        for k in range(4):
            if not flip and k == 0:
                continue  # the untransformed view, already run
            f = backbone.forward_features(torch.rot90(v, k, (2, 3)).contiguous()).float()
            f = torch.rot90(f, -k, (2, 3))
            f = f.flip(-1) if flip else f
            total += f
    return total / 8, first


def _cells_of_region(region, fmap: np.ndarray, plan: _Plan, view: np.ndarray | None = None) -> tuple:
    """(features (n, F), global cell rows, cols, tissue, region index, the untransformed view's features (n, F)
    or None) of the cells this region owns; `view` is that view's map when `fmap` is a TTA mean."""
    rows_total, cols_total = plan.grid_shape
    h, w = fmap.shape[1:]
    rlo, rhi = owned_range(region.row, rows_total, plan.region_cells, plan.overlap_cells)
    clo, chi = owned_range(region.col, cols_total, plan.region_cells, plan.overlap_cells)
    rr, cc = np.mgrid[rlo : min(rhi, h), clo : min(chi, w)]
    grow, gcol = rr.ravel() + region.row * plan.step_cells, cc.ravel() + region.col * plan.step_cells
    inside = (grow < plan.cell_grid[0]) & (gcol < plan.cell_grid[1])
    rr, cc, grow, gcol = rr.ravel()[inside], cc.ravel()[inside], grow[inside], gcol[inside]
    tissue = plan.tissue[grow, gcol]
    keep = (tissue >= plan.min_tissue) & (tissue > 0)
    feats = fmap[:, rr[keep], cc[keep]].T  # (n, F)
    view_feats = None if view is None else view[:, rr[keep], cc[keep]].T
    return feats, grow[keep], gcol[keep], tissue[keep], region.index, view_feats


def _assemble(parts, plan: _Plan, scale: float, slide_mpp: float, attrs: dict, backbone) -> CellFeatures:
    n_feat = int(backbone.num_features)
    if parts:
        feats = np.concatenate([p[0] for p in parts]).astype(np.float16)
        rows = np.concatenate([p[1] for p in parts]).astype(np.int64)
        cols = np.concatenate([p[2] for p in parts]).astype(np.int64)
        tissue = np.concatenate([p[3] for p in parts]).astype(np.float16)
        region = np.concatenate([np.full(len(p[1]), p[4], np.int32) for p in parts])
        views = [p[5] if len(p) > 5 else None for p in parts]
        view = None if any(v is None for v in views) else np.concatenate(views).astype(np.float16)
    else:
        feats = np.zeros((0, n_feat), np.float16)
        rows = cols = np.zeros(0, np.int64)
        tissue, region, view = np.zeros(0, np.float16), np.zeros(0, np.int32), None
    order = np.lexsort((cols, rows))  # by y, then x
    cell_px0 = plan.token_px * scale
    # Round to whole level-0 px from the global cell index: no drift across a large slide.
    coords = np.stack([np.round(cols * cell_px0), np.round(rows * cell_px0)], axis=1).astype(np.int64)[order]
    grids = {"cell_grid": list(plan.cell_grid), "region_grid": list(plan.grid_shape)}  # (rows, cols) each
    attrs = {**attrs, "n_cells": int(len(order)), **grids}
    return CellFeatures(
        features=feats[order],
        coords_px=coords,
        coords_um=(coords * slide_mpp).astype(np.float32),
        region_id=region[order],
        tissue=tissue[order],
        attrs=attrs,
        view_features=None if view is None else view[order],
    )


def _attrs(slide, grid, token_px: int, min_tissue: float, info: BackboneInfo | None, backbone) -> dict:
    if info is None:
        info = BackboneInfo("unnamed", state_dict_hash(backbone.state_dict()), grid.mpp, token_px, True)
    return {
        "format": STORE_FORMAT,
        "slide": slide.name,
        # absolute: a relative path means nothing once the store is read from another folder
        "slide_path": None if slide.path is None else os.path.abspath(slide.path),
        "dims": list(slide.dimensions),
        "slide_mpp": float(slide.mpp),
        "mpp": float(grid.mpp),
        "model_mpp": float(info.mpp),
        "model_id": info.model_id,
        "model_hash": info.model_hash,
        "model_trained": bool(info.trained),
        "stride": STRIDE,
        "token_px": int(token_px),
        "cell_px0": float(token_px * grid.scale),
        "region_px": int(grid.region_px),
        "overlap_px": int(grid.overlap_px),
        "min_tissue": float(min_tissue),
        "n_features": int(backbone.num_features),
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "package_version": __version__,
    }



def extract_to_store(slide, backbone, out: str | os.PathLike, **kwargs) -> FeatureStore:
    """`extract_slide(slide, backbone, **kwargs)` written to the store `out` (atomically)."""
    return FeatureStore.write(out, extract_slide(slide, backbone, **kwargs))
