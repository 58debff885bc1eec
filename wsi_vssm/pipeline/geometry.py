"""Region and cell geometry of extraction: default region sizes, the owner of each overlapping cell, and the
tissue fraction of every cell of a slide's global cell grid.

The region side and overlap defaults, which change a slide's outputs, are resolved here once
(`resolve_geometry`), so the cohort runner's parameter hash and the run itself cannot drift apart.
"""

from __future__ import annotations

import numpy as np

from wsi_vssm.errors import UsageError
from wsi_vssm.models.model_file import DEFAULT_TOKEN_PX, check_token_px

# Region side at the analysis mpp. CPU: measured with the micro model (docs/features.md), 2048 px regions cost
# no more per MP than 1024 px ones and lose less to overlap (14% vs 31%); larger ones were no cheaper.
DEFAULT_REGION_PX = {"cpu": 2048, "cuda": 10_000}
DEFAULT_OVERLAP_PX = 128  # 4 tokens: each kept cell is >= 2 tokens (64 px) from any internal region edge
DEFAULT_MIN_TISSUE = 0.25


def default_region_px(device: str, token_px: int = DEFAULT_TOKEN_PX) -> int:
    """The device's default region side, rounded down to whole tokens (10,000 -> 9,984 at 32 px tokens)."""
    side = DEFAULT_REGION_PX["cuda" if str(device).startswith("cuda") else "cpu"]
    return max(token_px, side // token_px * token_px)


MAX_ENLARGEMENT = 8.0  # a scan this many times coarser than the analysis resolution is refused (TooCoarse)


def check_enlargement(slide, analysis_mpp: float) -> None:
    """Before any region is read: a slide scanned coarser than `analysis_mpp` by more than MAX_ENLARGEMENT is
    refused (TooCoarse), naming the sizes: 20 um/px typed for 0.20 planned a 90,000 px image and hours of work.
    By more than the tolerance, it is warned about (also by extract, which has no domain check; a cohort run
    prints it with the slide's line)."""
    import warnings

    from wsi_vssm.io.errors import TooCoarse
    from wsi_vssm.pipeline.domain import MPP_TOLERANCE  # the domain check's: one tolerance for both

    factor = float(slide.mpp) / float(analysis_mpp)
    if factor <= MPP_TOLERANCE:
        return
    w, h = (round(d * factor) for d in slide.dimensions)
    what = (f"scanned at {slide.mpp:.4g} um/px ({slide.mpp_source}), read at {analysis_mpp:.4g} um/px it is "
            f"enlarged {factor:.3g}x ({w:,} x {h:,} px)")
    if factor > MAX_ENLARGEMENT:
        raise TooCoarse(slide.path or slide.name, f"{what}: without detail for the model; check its resolution "
                        "(--mpp, --fallback-mpp, a manifest's mpp), or read it coarser with --target-mpp")
    warnings.warn(f"{slide.path or slide.name}: {what}, without the detail the model was trained on: its results "
                  "are out of domain", stacklevel=3)


def resolve_geometry(device: str, token_px: int, region_px: int | None, overlap_px: int | None) -> tuple[int, int]:
    """(region_px, overlap_px) with the defaults filled in: the one place they are resolved."""
    region = default_region_px(device, token_px) if region_px is None else region_px
    overlap = DEFAULT_OVERLAP_PX if overlap_px is None else overlap_px
    return region, overlap


class GeometryError(UsageError):
    """A region geometry value is rejected; `param` names it (region_px, overlap_px or min_tissue) so that the
    CLI can name the option instead."""

    def __init__(self, param: str, reason: str):
        super().__init__(f"{param} {reason}")
        self.param, self.reason = param, reason


def check_geometry(token_px: int, region_px: int, overlap_px: int, min_tissue: float) -> None:
    """GeometryError for a region, overlap or tissue threshold extraction cannot use (a bad `token_px` is the
    model file's: UsageError from `check_token_px`)."""
    check_token_px(token_px)
    if not (isinstance(region_px, int) and region_px >= token_px and region_px % token_px == 0):
        raise GeometryError("region_px", f"must be a multiple of token_px={token_px}, got {region_px!r}")
    if not (isinstance(overlap_px, int) and 0 <= overlap_px < region_px and overlap_px % token_px == 0):
        raise GeometryError(
            "overlap_px", f"must be a multiple of token_px={token_px} in [0, region_px={region_px}), got {overlap_px!r}"
        )
    if not 0.0 <= min_tissue <= 1.0:
        raise GeometryError("min_tissue", f"must lie in [0, 1], got {min_tissue!r}")


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



def grid_size(slide, mpp: float, region_px: int, overlap_px: int) -> int:
    """Regions in the full grid (tissue or not) of `slide` at `mpp`: a cheap upper bound on `len(plan)`."""
    from wsi_vssm.io.regions import RegionGrid

    # RegionGrid's own shape rule, without building a grid (no tissue mask)
    rows, cols = RegionGrid.full_shape(slide.dimensions, float(mpp) / slide.require_mpp(), region_px, overlap_px)
    return rows * cols


def head_region_warning(metadata: dict | None, region_px: int, overlap_px: int) -> str | None:
    """A slide head learnt on features extracted with some region and overlap (`mil_stage.features`: a `train mil`
    checkpoint's, kept when it is attached, or the recipe's `mosaic_mil` stage's): a run that reads other regions
    gives it other features (a cell's features depend on where it lay in its region; docs/features.md), so its
    slide probability moves without a word. The words for the one warning, or None when they match or the model
    does not say (a head trained before 2026-12-06, r9's included). A list (stores of mixed settings) matches any
    of its values."""
    stage = (metadata or {}).get("mil_stage")
    features = stage.get("features") if isinstance(stage, dict) else None
    if not isinstance(features, dict):
        return None
    run = {"region_px": region_px, "overlap_px": overlap_px}
    # a list: the values of stores of mixed settings (None: a store that did not record it, which says nothing)
    known = {k: [x for x in v if x is not None] if isinstance(v, list) else v for k, v in features.items()}
    trained = {k: known.get(k) for k in run if known.get(k) not in (None, [])}
    off = [k for k, v in trained.items() if run[k] not in (v if isinstance(v, list) else [v])]
    if not off:
        return None

    def said(values):
        return " with ".join(f"{' or '.join(map(str, v)) if isinstance(v, list) else v} px "
                             f"{'regions' if k == 'region_px' else 'overlap'}" for k, v in values.items())

    match = " ".join(f"--{k.replace('_', '-')} {v[0] if isinstance(v, list) else v}" for k, v in trained.items())
    return (f"the model's slide head learnt from features of {said(trained)}; this run reads "
            f"{said({k: run[k] for k in trained})}, so its slide probabilities are not what the head was trained on "
            f"(a cell's features depend on its region): {match} matches")
