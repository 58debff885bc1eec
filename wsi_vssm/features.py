"""Slide -> token-cell features -> FeatureStore (one zarr v3 group per slide).

    regions (RegionGrid at the analysis mpp, overlapping by `overlap_px`)
      -> each region cropped to its whole cells inside the slide (no padding pixel reaches the backbone)
      -> VSSM.forward_features: stride-32 map (B, F, h, w)
      -> average-pooled to cells of `token_px` (one stride-32 token per cell for the default model)
      -> each cell kept only from the region that "owns" it (the one where it lies farthest from an edge)
      -> cells whose tissue fraction (thumbnail mask, area-resampled to the cell grid) < `min_tissue` dropped

Cells sit on one global grid aligned to the slide's top-left corner at the analysis resolution, so a cell's
coordinates never depend on the region layout. `extract_slide` does no file I/O (predict calls it too);
`extract_to_store` writes its result atomically. The image normalisation every backbone here expects
(`IMAGE_MEAN`, `IMAGE_STD`, `to_tensor`) is defined in this module and nowhere else.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from wsi_vssm import __version__
from wsi_vssm.errors import UsageError, WsiVssmError

# ImageNet statistics: VMamba's release weights and our PCam fine-tuning both use them.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

STRIDE = 32  # VSSM's last-stage stride: one token per 32 x 32 input px
STORE_FORMAT = "wsi-vssm-features/1"
MODEL_FORMAT = "wsi-vssm-model/1"
DEFAULT_MPP = 0.97  # PCam's ~10x: the analysis resolution of the default (registry) model
DEFAULT_TOKEN_PX = 32
# Region side at the analysis mpp. CPU: measured with the micro model (docs/features.md), 2048 px regions cost
# no more per MP than 1024 px ones and lose less to overlap (14% vs 31%); larger ones were no cheaper.
DEFAULT_REGION_PX = {"cpu": 2048, "cuda": 10_000}
DEFAULT_OVERLAP_PX = 128  # 4 tokens: each kept cell is >= 2 tokens (64 px) from any internal region edge
DEFAULT_MIN_TISSUE = 0.25
ARRAYS = ("features", "coords_px", "coords_um", "region_id", "tissue")


class FeatureStoreError(WsiVssmError):
    """A feature store that cannot be read or written; the message names the store."""


class Device(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"


# ---- normalisation ----------------------------------------------------------------------------------------
def to_tensor(rgb: np.ndarray):
    """An H x W x 3 uint8 RGB image -> a (1, 3, H, W) float32 tensor in [0, 1], normalised by IMAGE_MEAN/STD."""
    import torch

    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise UsageError(f"to_tensor needs an H x W x 3 uint8 image, got {a.shape} {a.dtype}")
    if not (a.flags.c_contiguous and a.flags.writeable):
        a = np.array(a)  # torch cannot wrap read-only memory; a crop is not contiguous anyway
    t = torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return t.sub_(mean).div_(std)


# ---- backbones --------------------------------------------------------------------------------------------
@dataclass
class BackboneInfo:
    """What a feature store records about the backbone that made it."""

    model_id: str
    model_hash: str  # sha256 over the state dict (names, dtypes, shapes, bytes), see `state_dict_hash`
    mpp: float  # the resolution the model was trained at
    token_px: int
    trained: bool = True
    stride: int = STRIDE


def state_dict_hash(state_dict: Mapping) -> str:
    """sha256 over a state dict's sorted names, dtypes, shapes and bytes: the same weights, the same hash,
    whichever file (a bare backbone or a whole slide model) they came from."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        raw = t.view(torch.uint8) if t.dim() > 0 else t.reshape(1).view(torch.uint8)
        h.update(raw.numpy().tobytes())
    return h.hexdigest()


def load_backbone(model: str | os.PathLike):
    """A VSSM backbone (eval mode) and its `BackboneInfo` from a registry name or a model file.

    A registry name (e.g. `micro`) gives seeded random weights (untrained: a warning says so) at DEFAULT_MPP.
    A file is read with torch.load(weights_only=True) and must hold {"format": "wsi-vssm-model/1",
    "backbone_config": {...VSSMConfig...}, "mpp": float, "token_px": int, "state_dict": {...}}; keys under
    `backbone.` are taken (a whole slide model also holds `mil.`), or all keys if none carries that prefix.
    """
    from wsi_vssm.models import MODEL_CONFIGS

    if isinstance(model, str) and model in MODEL_CONFIGS and not Path(model).exists():
        return _registry_backbone(model)
    return _file_backbone(Path(model))


def _registry_backbone(name: str):
    import torch

    from wsi_vssm.models import create_model

    warnings.warn(
        f"model {name!r} is a bare registry config with random (untrained) weights; its features carry no "
        "meaning beyond tests and demos. Pass a trained model file for real use.",
        stacklevel=3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same random weights every run, so stores made with them agree (same hash)
        backbone = create_model(name, num_classes=0).eval()
    info = BackboneInfo(name, state_dict_hash(backbone.state_dict()), DEFAULT_MPP, DEFAULT_TOKEN_PX, False)
    return backbone, info


def _file_backbone(path: Path):
    from wsi_vssm.models import VSSM, VSSMConfig
    from wsi_vssm.models.checkpoint import CheckpointError
    from wsi_vssm.models.slide_model import check_weights, read_model_file

    # the one model-file reader (weights_only=True, format, keys, tensors); a backbone needs no mil_config
    ckpt = read_model_file(path, required=("backbone_config", "mpp", "token_px", "state_dict"))
    sd = ckpt["state_dict"]
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    try:
        backbone = VSSM(VSSMConfig(**dict(ckpt["backbone_config"])))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad backbone_config: {e}") from e
    check_weights(backbone, sd, path)  # same architecture, finite values; sd stays as stored, for the hash
    backbone.load_state_dict(sd, strict=True)
    try:
        mpp, token_px = float(ckpt["mpp"]), int(ckpt["token_px"])
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: model file states an invalid mpp or token_px "
                              f"({ckpt['mpp']!r}, {ckpt['token_px']!r})") from None
    _check_token_px(token_px)
    if not (math.isfinite(mpp) and mpp > 0):
        raise CheckpointError(f"{path}: model file states an invalid mpp {ckpt['mpp']!r}")
    model_id = str(ckpt.get("model_id") or ckpt.get("name") or path.stem)
    return backbone.eval(), BackboneInfo(model_id, state_dict_hash(sd), mpp, token_px, True)


# ---- results ----------------------------------------------------------------------------------------------
@dataclass
class CellFeatures:
    """The cells of one slide. Rows are sorted by (y, x)."""

    features: np.ndarray  # (n, F) float16
    coords_px: np.ndarray  # (n, 2) int64: each cell's top-left (x, y) in level-0 px
    coords_um: np.ndarray  # (n, 2) float32: the same in um (level-0 px x slide_mpp)
    region_id: np.ndarray  # (n,) int32: the RegionGrid index the cell was taken from
    tissue: np.ndarray  # (n,) float16: tissue fraction of the cell
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])


def resolve_device(device: str) -> str:
    """'cpu', 'cuda' or 'auto' (cuda when available) -> 'cpu' or 'cuda'; unknown names list the valid ones."""
    import torch

    try:
        d = Device(str(device).lower())
    except ValueError:
        raise UsageError(f"unknown device {device!r}; choose one of: {', '.join(x.value for x in Device)}") from None
    if d is Device.AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d is Device.CUDA and not torch.cuda.is_available():
        raise UsageError("device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return d.value


def default_region_px(device: str, token_px: int = DEFAULT_TOKEN_PX) -> int:
    """The device's default region side, rounded down to whole tokens (10,000 -> 9,984 at 32 px tokens)."""
    side = DEFAULT_REGION_PX["cuda" if str(device).startswith("cuda") else "cpu"]
    return max(token_px, side // token_px * token_px)


def _check_token_px(token_px: int) -> None:
    if not (isinstance(token_px, int) and token_px >= STRIDE and token_px % STRIDE == 0):
        raise UsageError(f"token_px must be a positive multiple of {STRIDE}, got {token_px!r}")


def check_geometry(token_px: int, region_px: int, overlap_px: int, min_tissue: float) -> None:
    _check_token_px(token_px)
    if not (isinstance(region_px, int) and region_px >= token_px and region_px % token_px == 0):
        raise UsageError(f"region_px must be a multiple of token_px={token_px}, got {region_px!r}")
    if not (isinstance(overlap_px, int) and 0 <= overlap_px < region_px and overlap_px % token_px == 0):
        raise UsageError(
            f"overlap_px must be a multiple of token_px={token_px} in [0, region_px={region_px}), got {overlap_px!r}"
        )
    if not 0.0 <= min_tissue <= 1.0:
        raise UsageError(f"min_tissue must lie in [0, 1], got {min_tissue!r}")


# ---- geometry ---------------------------------------------------------------------------------------------
def owned_range(index: int, count: int, cells: int, overlap: int) -> tuple[int, int]:
    """The local cells [lo, hi) along one axis that region `index` of `count` owns.

    Neighbours share `overlap` cells; the boundary between them lies in the middle of the shared cells, so each
    cell is taken from the region where it is farthest from the edge (>= overlap // 2 cells from any internal
    edge). The first and last regions also own the cells at the slide's edges.
    """
    lo = 0 if index == 0 else overlap // 2
    hi = cells if index == count - 1 else cells - (overlap - overlap // 2)
    return lo, hi


def coverage_matrix(n_cells: int, cell: float, n_px: int, px: float) -> np.ndarray:
    """(n_cells, n_px) weights: the length of cell i ([i*cell, (i+1)*cell)) covered by mask pixel j
    ([j*px, (j+1)*px)), as a fraction of the cell's length. Beyond the mask counts as background."""
    c0 = np.arange(n_cells, dtype=np.float64)[:, None] * cell
    p0 = np.arange(n_px, dtype=np.float64)[None, :] * px
    overlap = np.minimum(c0 + cell, p0 + px) - np.maximum(c0, p0)
    return (np.clip(overlap, 0.0, None) / cell).astype(np.float32)


def cell_tissue_map(mask: np.ndarray, mask_scale: float, cell_px0: float, shape: tuple[int, int]) -> np.ndarray:
    """Tissue fraction of every cell of the global (rows, cols) cell grid, area-resampled from the mask."""
    m = np.asarray(mask, dtype=np.float32)
    wy = coverage_matrix(shape[0], cell_px0, m.shape[0], mask_scale)
    wx = coverage_matrix(shape[1], cell_px0, m.shape[1], mask_scale)
    return np.clip(wy @ m @ wx.T, 0.0, 1.0)


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
    overlap_px: int = DEFAULT_OVERLAP_PX,
    device: str = "cpu",
    min_tissue: float = DEFAULT_MIN_TISSUE,
    info: BackboneInfo | None = None,
    tissue: tuple[np.ndarray, float] | None = None,
) -> SlidePlan:
    """The tissue mask (unless given), region grid and cell plan of an open slide; see `extract_slide`."""
    from wsi_vssm.io.regions import NoTissueWarning, RegionGrid

    dev = resolve_device(device)
    region_px = default_region_px(dev, token_px) if region_px is None else region_px
    check_geometry(token_px, region_px, overlap_px, min_tissue)
    slide_mpp = slide.require_mpp()
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


def grid_size(slide, mpp: float, region_px: int, overlap_px: int) -> int:
    """Regions in the full grid (tissue or not) of `slide` at `mpp`: a cheap upper bound on `len(plan)`."""
    from wsi_vssm.io.regions import RegionGrid

    # RegionGrid's own shape rule, without building a grid (no tissue mask)
    rows, cols = RegionGrid.full_shape(slide.dimensions, float(mpp) / slide.require_mpp(), region_px, overlap_px)
    return rows * cols


def extract_regions(
    slide,
    backbone,
    plan: SlidePlan,
    region_indices=None,
    batch_size: int = 1,
    workers: int = 2,
    amp: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple]:
    """The cells owned by the plan's regions `region_indices` (default: all), as per-region tuples
    (features, global cell rows, cols, tissue, region index) for `assemble_cells`. Any split of the regions
    into calls gives the same cells as one call (batches of `batch_size` form within a call)."""
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    grid = plan.grid
    regions = list(grid) if region_indices is None else [grid[int(i)] for i in region_indices]
    dev = plan.device
    return _run_regions(slide, regions, grid.mpp, backbone.to(dev).eval(), plan.plan, batch_size, workers, dev,
                        amp, progress)


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
    overlap_px: int = DEFAULT_OVERLAP_PX,
    batch_size: int = 1,
    workers: int = 2,
    device: str = "cpu",
    amp: bool = False,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    progress: Callable[[int, int], None] | None = None,
    info: BackboneInfo | None = None,
    tissue: tuple[np.ndarray, float] | None = None,
    run_regions: Callable[[SlidePlan], list[tuple]] | None = None,
) -> CellFeatures:
    """The token-cell features of an open slide at analysis resolution `mpp` (no file I/O besides reading).

    `backbone` is a VSSM (its `forward_features` is used); `info` (from `load_backbone`) goes into the attrs.
    `region_px` defaults by device (DEFAULT_REGION_PX); `progress(done, total)` is called per region.
    `tissue` = (mask, level-0 px per mask px) overrides the thumbnail tissue mask.
    `run_regions(plan)`, when given, returns the parts of all the plan's regions instead of `extract_regions`
    in this process (the cohort runner spreads a large slide's regions over a Dask cluster with it).
    Raises MissingMpp when the slide has no resolution, UsageError on bad arguments.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    # plan_slide resolves the device and region size and checks the geometry
    plan = plan_slide(slide, backbone, mpp, token_px=token_px, region_px=region_px, overlap_px=overlap_px,
                      device=device, min_tissue=min_tissue, info=info, tissue=tissue)
    if run_regions is None:
        parts = extract_regions(slide, backbone, plan, batch_size=batch_size, workers=workers, amp=amp,
                                progress=progress)
    else:
        parts = run_regions(plan)
    return assemble_cells(plan, parts, backbone)


def _run_regions(slide, regions, mpp, backbone, plan, batch_size, workers, dev, amp, progress) -> list[tuple]:
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
                parts += _run_batch(batch, backbone, plan, dev, amp)
                done += len(batch)
                batch = []
                if progress is not None:
                    progress(done, total)
            batch.append(item)
        if batch:
            parts += _run_batch(batch, backbone, plan, dev, amp)
    if progress is not None:
        progress(total, total)
    return parts


def _source(slide):
    """Per-worker readers for file slides (tifffile/zarr handles are not thread-safe); the slide itself else."""
    if slide.path is None or slide.backend not in ("openslide", "tifffile", "zarr"):
        return slide
    from wsi_vssm.io import open_slide

    path, backend = slide.path, slide.backend
    # A user-given or estimated mpp is passed on (silently: the file states none); a stated one is re-read.
    mpp = slide.mpp if slide.mpp_source in ("user", "objective-power") else None
    return lambda: open_slide(path, backend=backend, mpp=mpp)


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


def _run_batch(batch: list[tuple], backbone, plan: _Plan, device: str, amp: bool) -> list[tuple]:
    import torch
    import torch.nn.functional as F

    x = torch.cat([b[1] for b in batch]).to(device, non_blocking=True)  # (B, 3, H, W)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device == "cuda"):
        fmap = backbone.forward_features(x)  # (B, F, H/32, W/32)
    k = plan.token_px // STRIDE
    if k > 1:
        fmap = F.avg_pool2d(fmap.float(), k, k)  # (B, F, H/token_px, W/token_px)
    fmap = fmap.float().cpu().numpy()
    return [_cells_of_region(region, fmap[i], plan) for i, (region, _, _) in enumerate(batch)]


def _cells_of_region(region, fmap: np.ndarray, plan: _Plan) -> tuple:
    """(features (n, F), global cell rows, cols, tissue, region index) of the cells this region owns."""
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
    return feats, grow[keep], gcol[keep], tissue[keep], region.index


def _assemble(parts, plan: _Plan, scale: float, slide_mpp: float, attrs: dict, backbone) -> CellFeatures:
    n_feat = int(backbone.num_features)
    if parts:
        feats = np.concatenate([p[0] for p in parts]).astype(np.float16)
        rows = np.concatenate([p[1] for p in parts]).astype(np.int64)
        cols = np.concatenate([p[2] for p in parts]).astype(np.int64)
        tissue = np.concatenate([p[3] for p in parts]).astype(np.float16)
        region = np.concatenate([np.full(len(p[1]), p[4], np.int32) for p in parts])
    else:
        feats = np.zeros((0, n_feat), np.float16)
        rows = cols = np.zeros(0, np.int64)
        tissue, region = np.zeros(0, np.float16), np.zeros(0, np.int32)
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
    )


def _attrs(slide, grid, token_px: int, min_tissue: float, info: BackboneInfo | None, backbone) -> dict:
    if info is None:
        info = BackboneInfo("unnamed", state_dict_hash(backbone.state_dict()), grid.mpp, token_px, True)
    return {
        "format": STORE_FORMAT,
        "slide": slide.name,
        "slide_path": None if slide.path is None else os.fspath(slide.path),
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


# ---- the store --------------------------------------------------------------------------------------------
class FeatureStore:
    """One slide's cells in a zarr v3 group. Arrays (`features`, `coords_px`, `coords_um`, `region_id`,
    `tissue`) are zarr arrays read on demand; `attrs` is a plain dict; `load()` reads everything."""

    def __init__(self, path: Path, group):
        self.path = path
        self._group = group
        self.attrs = dict(group.attrs)

    # -- writing
    @classmethod
    def write(cls, path: str | os.PathLike, cells: CellFeatures) -> FeatureStore:
        """Write `cells` to `path` (a directory, usually `<slide>.zarr`) atomically: built beside it, renamed."""
        import zarr

        from wsi_vssm.atomic import atomic_dir

        path = Path(path)
        try:
            with atomic_dir(path) as tmp:
                group = zarr.open_group(tmp, mode="w", zarr_format=3)
                group.attrs.update(_jsonable(cells.attrs))
                for name in ARRAYS:
                    data = np.ascontiguousarray(getattr(cells, name))
                    chunks = (max(1, min(len(data), 65536)),) + data.shape[1:]
                    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks)
                    if data.size:
                        arr[...] = data
        except OSError as e:
            raise FeatureStoreError(f"{path}: cannot write the feature store: {e.strerror or e}") from e
        return cls.open(path)

    # -- reading
    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        """Open a store lazily; a missing, foreign or damaged store raises FeatureStoreError (one line)."""
        import zarr

        path = Path(path)
        if not path.is_dir():
            raise FeatureStoreError(f"{path}: no feature store here")
        try:
            group = zarr.open_group(path, mode="r", zarr_format=3)
            store = cls(path, group)
            arrays = {name: group[name] for name in ARRAYS}
        except Exception as e:  # zarr has no common base for a broken store (KeyError, JSON, metadata errors...)
            raise FeatureStoreError(f"{path}: damaged feature store ({type(e).__name__}: {_first_line(e)})") from e
        store._check(arrays)
        store._arrays = arrays
        return store

    def _check(self, arrays) -> None:
        if self.attrs.get("format") != STORE_FORMAT:
            raise FeatureStoreError(f"{self.path}: not a wsi-vssm feature store (format {self.attrs.get('format')!r})")
        n = arrays["features"].shape[0]
        if any(arrays[a].shape[0] != n for a in ARRAYS) or arrays["features"].ndim != 2:
            shapes = {a: arrays[a].shape for a in ARRAYS}
            raise FeatureStoreError(f"{self.path}: damaged feature store (inconsistent array shapes {shapes})")

    def __getattr__(self, name):
        if name in ARRAYS:
            return self.__dict__["_arrays"][name]
        raise AttributeError(name)

    def __len__(self) -> int:
        return int(self._arrays["features"].shape[0])

    @property
    def name(self) -> str:
        return str(self.attrs.get("slide", self.path.name.removesuffix(".zarr")))

    def load(self) -> CellFeatures:
        """Every array in memory, as a CellFeatures; a chunk that fails to decode raises FeatureStoreError."""
        try:
            data = {a: np.asarray(self._arrays[a][...]) for a in ARRAYS}
        except Exception as e:  # codec / missing-chunk errors differ by zarr version
            raise FeatureStoreError(f"{self.path}: damaged feature store ({type(e).__name__}: {_first_line(e)})") from e
        return CellFeatures(attrs=dict(self.attrs), **data)

    def read_features(self) -> np.ndarray:
        try:
            return np.asarray(self._arrays["features"][...])
        except Exception as e:  # as in load()
            raise FeatureStoreError(f"{self.path}: damaged feature store ({type(e).__name__}: {_first_line(e)})") from e

    def __repr__(self) -> str:
        return f"<FeatureStore {self.path} {len(self)} cells model={self.attrs.get('model_id')}>"


def extract_to_store(slide, backbone, out: str | os.PathLike, **kwargs) -> FeatureStore:
    """`extract_slide(slide, backbone, **kwargs)` written to the store `out` (atomically)."""
    return FeatureStore.write(out, extract_slide(slide, backbone, **kwargs))


def _jsonable(obj):
    from wsi_vssm.atomic import to_jsonable

    return to_jsonable(obj)


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] if text else ""
