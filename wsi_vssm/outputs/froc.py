"""CAMELYON16 lesion-level FROC: sensitivity at 1/4, 1/2, 1, 2, 4 and 8 average false positives per slide.

The rules follow the challenge's evaluation script (Evaluation_FROC.py), with geometry in level-0 pixels instead
of a level-5 mask:

* Lesions. The tumour polygons (excluded `_2` regions already cut out, see `wsi_vssm.io.annotations`) are
  dilated by `dilation_um` (37.5 um: the script's distance threshold of 75 um / 2, "about 5 tumour cells"
  across), holes are filled, and each connected piece is one lesion.
* Isolated tumour cells. A lesion whose major axis (of its dilated region, from its second moments as
  scikit-image's `regionprops` measures it) is under `itc_um` (275 um) is an ITC: missing it is no false
  negative, and hitting it is no false positive (the hit is ignored).
* Detections are (x, y, probability) in level-0 pixels. One inside a lesion is a hit; per lesion only the
  highest-probability hit counts (as its true-positive probability), further hits are ignored. One outside
  every lesion is a false positive, except (our addition, as the issue asks) inside an excluded region, where
  it is ignored. On slides without annotations every detection is a false positive.
* The curve: lowering the threshold through each distinct detection probability t traces points (FPs per
  slide, sensitivity): false positives with p >= t over all slides, and lesions whose best hit has p >= t over
  all non-ITC lesions; it starts at (0, 0). The six sensitivities are linearly interpolated along it (clamped
  at its end), and the FROC score is their mean. Where one FP rate has several points (a vertical step), a
  rate just below it interpolates towards the lowest of them and the rate itself takes the highest, which is
  what the script's np.interp does on its threshold-ordered points. The script also drops its lowest
  threshold, to skip the 0 it stores for missed lesions and ITCs; here those simply never count, which gives
  the same curve whenever some lesion is missed or is an ITC and every detection has p > 0 (otherwise the
  script loses its lowest operating point).
* Distances use each slide's own mpp (the script assumes 0.243 um/px for every slide).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from wsi_vssm.errors import UsageError
from wsi_vssm.outputs.heatmap import _grid, _pair, _positive

FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
DILATION_UM = 37.5
ITC_UM = 275.0


@dataclass
class FrocResult:
    """`score` is None (with `reason`) when no slide was scored or there is no non-ITC lesion in the cohort."""

    score: float | None
    sensitivity: dict[float, float | None]  # at each of FP_RATES
    fps_per_slide: np.ndarray  # the curve, in threshold order (see froc_curve)
    sensitivities: np.ndarray
    n_slides: int
    n_lesions: int  # not counting ITCs
    n_itc: int
    n_detections: int
    reason: str | None = None
    per_slide: dict[str, dict] = field(default_factory=dict)
    score_ci95: list[float] | None = None  # with froc(n_boot=N): the slide bootstrap's (froc_score_ci)
    dilation_um: float = DILATION_UM
    itc_um: float = ITC_UM

    def as_dict(self) -> dict:
        """JSON-ready: score and its interval, sensitivity at each FP rate (keys as strings), counts, reason, the
        rule's constants, per-slide counts."""
        return {
            "froc": self.score,
            "froc_ci95": self.score_ci95,
            "sensitivity_at_fps": {f"{r:g}": v for r, v in self.sensitivity.items()},
            "n_slides": self.n_slides,
            "n_lesions": self.n_lesions,
            "n_itc": self.n_itc,
            "n_detections": self.n_detections,
            "reason": self.reason,
            "dilation_um": self.dilation_um,
            "itc_um": self.itc_um,
            "per_slide": self.per_slide,
        }


def detections_from_heatmap(
    prob: np.ndarray, cell0: float, origin: tuple[float, float], threshold: float = 0.5, min_distance: int = 1
) -> np.ndarray:
    """Local maxima of a heatmap as detections: an (n, 3) float64 array of x, y (level-0 px), probability.

    A cell is a maximum when it is >= `threshold` and no cell within `min_distance` cells (a square window)
    is higher. A plateau of equal maxima (e.g. a lesion saturated at 1.0) gives one detection, at the member
    nearest its centroid, and none when a higher cell lies within `min_distance` of any of its members.
    Detections sit at cell centres and come sorted by probability, highest first.
    """
    prob = _grid(prob)
    cell0 = _positive(cell0, "cell0")
    x0, y0 = _pair(origin, "origin")
    if not (isinstance(min_distance, int) and min_distance >= 1):
        raise UsageError(f"min_distance must be a positive integer, got {min_distance!r}")
    v = np.where(np.isfinite(prob), prob, -np.inf)
    peak = (v >= threshold) & (v == ndi.maximum_filter(v, size=2 * min_distance + 1, mode="constant", cval=-np.inf))
    labels, n = ndi.label(peak, structure=np.ones((3, 3)))
    shelves = _shelves(v, peak, labels)
    out = np.empty((n, 3))
    for k, sl in enumerate(ndi.find_objects(labels)):
        if k + 1 in shelves:
            out[k] = np.nan
            continue
        rows, cols = np.nonzero(labels[sl] == k + 1)
        rows, cols = rows + sl[0].start, cols + sl[1].start
        pick = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
        r, c = rows[pick], cols[pick]
        out[k] = (x0 + (c + 0.5) * cell0, y0 + (r + 0.5) * cell0, v[r, c])
    out = out[~np.isnan(out[:, 2])]
    return out[np.argsort(-out[:, 2], kind="stable")]


def _shelves(v: np.ndarray, peak: np.ndarray, labels: np.ndarray) -> set[int]:
    """The labels of peak groups that touch a cell of their own value that is no peak: a shelf beside a higher
    cell, whose far end the window alone took for a maximum. (Touching peaks are equal, so a group is one value;
    the equal cells it runs into are all reached through a neighbour of the group.)"""
    h, w = v.shape
    found: set[int] = set()
    foot = ~peak & np.isfinite(v)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                src = (slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0)))
                dst = (slice(max(-dy, 0), h + min(-dy, 0)), slice(max(-dx, 0), w + min(-dx, 0)))
                found.update(np.unique(labels[dst][foot[src] & peak[dst] & (v[src] == v[dst])]).tolist())
    return found


def lesion_regions(
    tumor: BaseGeometry | None, slide_mpp: float, dilation_um: float = DILATION_UM, itc_um: float = ITC_UM,
    slide_size: tuple[float, float] | None = None,
) -> tuple[list[Polygon], list[bool]]:
    """The evaluation lesions of one slide (dilated, holes filled, level-0 px) and whether each is an ITC.
    `slide_size` (width, height in level-0 px): the dilation stops at the slide's edge, as the challenge's
    dilated mask does (a lesion cut by the edge measured up to 20% longer past it, and could leave the ITCs)."""
    slide_mpp = _positive(slide_mpp, "slide mpp")
    if tumor is None or tumor.is_empty:
        return [], []
    parts = _polygons(tumor)
    if dilation_um <= 0:
        grown = tumor
    elif len(parts) == 1:
        grown = parts[0].buffer(dilation_um / slide_mpp, quad_segs=8)
    else:  # part by part, then their union: GEOS's buffer of one 90,000-part MultiPolygon ran past 6 GB
        grown = shapely.union_all(shapely.buffer(np.array(parts, dtype=object), dilation_um / slide_mpp, quad_segs=8))
    if slide_size is not None:
        grown = grown.intersection(shapely.box(0, 0, *slide_size))
    filled = shapely.union_all([Polygon(p.exterior) for p in _polygons(grown)])  # fill holes, absorb islands
    lesions = sorted(_polygons(filled), key=lambda p: (p.bounds[1], p.bounds[0]))
    return lesions, [major_axis_length(p) * slide_mpp < itc_um for p in lesions]


def major_axis_length(poly: Polygon) -> float:
    """4 * sqrt(largest eigenvalue of the area's covariance): the major axis of the same-moment ellipse."""
    poly = shapely.normalize(poly)  # exterior and holes in opposite directions, so signed sums subtract holes
    cx, cy = poly.centroid.x, poly.centroid.y
    a = sxx = syy = sxy = 0.0
    for ring in (poly.exterior, *poly.interiors):
        xy = np.asarray(ring.coords) - (cx, cy)
        x, y, xn, yn = xy[:-1, 0], xy[:-1, 1], xy[1:, 0], xy[1:, 1]
        cross = x * yn - xn * y
        a += cross.sum() / 2
        sxx += ((x * x + x * xn + xn * xn) * cross).sum() / 12
        syy += ((y * y + y * yn + yn * yn) * cross).sum() / 12
        sxy += ((x * yn + 2 * x * y + 2 * xn * yn + xn * y) * cross).sum() / 24
    if a == 0:
        return 0.0
    vx, vy, cxy = sxx / a, syy / a, sxy / a
    lam = (vx + vy) / 2 + math.sqrt(((vx - vy) / 2) ** 2 + cxy**2)
    return 4 * math.sqrt(max(lam, 0.0))


def slide_hits(
    detections: np.ndarray, lesions: list[Polygon], is_itc: list[bool], excluded: BaseGeometry | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive probabilities, best-hit probability per non-ITC lesion with NaN where missed)."""
    det = _detections(detections)
    x, y, p = det[:, 0], det[:, 1], det[:, 2]
    free = np.ones(len(det), dtype=bool)  # not inside any lesion
    best = []
    for lesion, itc in zip(lesions, is_itc, strict=True):
        inside = shapely.intersects_xy(lesion, x, y)
        free &= ~inside
        if not itc:
            best.append(float(p[inside].max()) if inside.any() else math.nan)
    if excluded is not None and not excluded.is_empty:
        free &= ~shapely.intersects_xy(excluded, x, y)
    return p[free], np.asarray(best, dtype=np.float64)


def froc(
    detections: Mapping[str, np.ndarray],
    annotations: Mapping[str, object],
    slide_mpp: Mapping[str, float] | float,
    dilation_um: float = DILATION_UM,
    itc_um: float = ITC_UM,
    slide_size: Mapping[str, tuple[float, float]] | None = None,
    n_boot: int = 0,
) -> FrocResult:
    """The cohort's FROC. `detections` has every evaluated slide (an (n, 3) array each, possibly empty);
    `annotations` maps tumour slides to an `AnnotationSet` (or anything with `tumor` and `excluded`
    geometries); slides absent from it are normal. `slide_mpp` is one value or one per slide; `slide_size`, where
    given, each slide's (width, height) in level-0 px (`lesion_regions`). With no slide (every slide failed or
    had no tissue) the score is None, with a reason, as with no lesion. `n_boot` > 0 adds the score's 95%
    interval over that many slide resamples (`froc_score_ci`)."""
    extra = sorted(set(annotations) - set(detections))
    if extra:
        raise UsageError(f"annotated slide(s) without detections: {extra[:5]}; pass an empty array for none")
    if not detections:
        return FrocResult(None, dict.fromkeys(FP_RATES), fps_per_slide=np.zeros(1), sensitivities=np.zeros(1),
                          n_slides=0, n_lesions=0, n_itc=0, n_detections=0, reason="no slide was scored")
    fps, tps, per_slide = [], [], {}
    n_itc = n_det = 0
    for name, det in detections.items():
        ann = annotations.get(name)
        mpp = slide_mpp if not isinstance(slide_mpp, Mapping) else slide_mpp.get(name)
        if mpp is None:
            raise UsageError(f"no mpp for slide {name!r}")
        size = None if slide_size is None else slide_size.get(name)
        lesions, itc = lesion_regions(getattr(ann, "tumor", None), mpp, dilation_um, itc_um, size)
        fp, tp = slide_hits(det, lesions, itc, getattr(ann, "excluded", None))
        fps.append(fp)
        tps.append(tp)
        n_itc += sum(itc)
        n_det += len(_detections(det))
        per_slide[name] = {
            "lesions": len(lesions) - sum(itc),
            "itc": sum(itc),
            "detected": int(np.isfinite(tp).sum()),
            "false_positives": int(fp.size),
        }
    all_fp, all_tp = np.concatenate(fps), np.concatenate(tps)
    curve_fp, curve_sens = froc_curve(all_fp, all_tp, len(detections))
    common = dict(
        dilation_um=dilation_um,
        itc_um=itc_um,
        fps_per_slide=curve_fp,
        sensitivities=curve_sens,
        n_slides=len(detections),
        n_lesions=int(all_tp.size),
        n_itc=n_itc,
        n_detections=n_det,
        per_slide=per_slide,
    )
    if all_tp.size == 0:
        return FrocResult(None, dict.fromkeys(FP_RATES), reason="no lesions (other than ITCs) in the cohort", **common)
    at = {r: interpolate_curve(curve_fp, curve_sens, r) for r in FP_RATES}
    ci = froc_score_ci(fps, tps, n_boot) if n_boot else None
    return FrocResult(float(np.mean(list(at.values()))), at, score_ci95=ci, **common)


def froc_score(fps: list[np.ndarray], tps: list[np.ndarray]) -> float:
    """The FROC score of slides given by their false-positive and best-hit probabilities (`slide_hits`)."""
    rate, sens = froc_curve(np.concatenate(fps), np.concatenate(tps), len(fps))
    return float(np.mean([interpolate_curve(rate, sens, r) for r in FP_RATES]))


def froc_score_ci(fps: list[np.ndarray], tps: list[np.ndarray], n_boot: int = 2000, seed: int = 0,
                  alpha: float = 0.05) -> list[float] | None:
    """Percentile (1 - alpha) interval of the FROC score over `n_boot` resamples of the slides, stratified: the
    slides with a lesion (other than ITCs) and those without are each resampled to their own count, so every
    resample has lesions and the cohort's mix. A slide's detections and lesions move together (they are not
    independent within it). None without a slide that has a lesion."""
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise UsageError(f"n_boot must be a positive integer, got {n_boot!r}")
    with_lesion = [i for i, t in enumerate(tps) if t.size]
    without = [i for i, t in enumerate(tps) if not t.size]
    if not with_lesion:
        return None
    rng = np.random.default_rng(seed)
    scores = np.empty(n_boot)
    for b in range(n_boot):
        pick = [*(with_lesion[k] for k in rng.integers(0, len(with_lesion), len(with_lesion))),
                *(without[k] for k in rng.integers(0, len(without), len(without)))]
        scores[b] = froc_score([fps[i] for i in pick], [tps[i] for i in pick])
    low, high = np.quantile(scores, [alpha / 2, 1 - alpha / 2])
    return [float(low), float(high)]


def froc_png(path: str | os.PathLike, result: FrocResult) -> None:
    """Write the FROC curve to `path` as PNG, atomically: sensitivity against average false positives per slide
    (log scale, as CAMELYON16 drew it), the six operating points and the score in the title. Without a score the
    plot says why."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from wsi_vssm.atomic import atomic_write_figure
    from wsi_vssm.outputs.report_text import interval_text

    fig = Figure(figsize=(5.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)  # the Agg canvas directly: no pyplot global state
    ax = fig.add_subplot()
    lo, hi = FP_RATES[0] / 2, FP_RATES[-1] * 2
    lesions = f"{result.n_lesions} lesion(s) ({result.n_itc} ITC left out) on {result.n_slides} slide(s)"
    if result.score is None:
        ax.text(0.5, 0.5, f"FROC undefined:\n{result.reason}", ha="center", va="center", fontsize=9,
                transform=ax.transAxes)
        ax.set_title(lesions, fontsize=9)
    else:
        # the curve as the score reads it (linear in the FP rate), sampled densely: straight segments between its
        # points would bend on the log axis and miss the operating points
        rate = np.geomspace(lo, hi, 512)
        sens = [interpolate_curve(result.fps_per_slide, result.sensitivities, r) for r in rate]
        ax.plot(rate, sens, lw=1.4, color="C3", label="sensitivity")
        rates = list(result.sensitivity)
        ax.plot(rates, [result.sensitivity[r] for r in rates], "o", color="k", ms=4, clip_on=False,
                label="the six operating points")
        ax.set_title(f"FROC {result.score:.3f}{interval_text(result.score_ci95, 'score')}: {lesions}", fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(FP_RATES, [f"{r:g}" for r in FP_RATES])
    ax.set(xlim=(lo, hi), ylim=(0, 1.01), xlabel="average false positives per slide", ylabel="lesion sensitivity")
    ax.grid(True, lw=0.4, color="0.85")
    fig.tight_layout()
    atomic_write_figure(path, fig)


def froc_curve(fp_probs: np.ndarray, tp_probs: np.ndarray, n_slides: int) -> tuple[np.ndarray, np.ndarray]:
    """(FPs per slide, sensitivity) in threshold order (both non-decreasing), from (0, 0); NaN in `tp_probs`
    marks a missed lesion."""
    fp_probs, tp_probs = np.asarray(fp_probs, float), np.asarray(tp_probs, float)
    hits = tp_probs[np.isfinite(tp_probs)]
    thresholds = np.unique(np.concatenate([fp_probs, hits]))[::-1]  # highest first
    n_fp = fp_probs.size - np.searchsorted(np.sort(fp_probs), thresholds, side="left")  # count of p >= t
    n_tp = hits.size - np.searchsorted(np.sort(hits), thresholds, side="left")
    rate = np.r_[0.0, n_fp / n_slides]
    sens = np.r_[0.0, n_tp / tp_probs.size] if tp_probs.size else np.zeros(rate.size)
    return rate, sens


def interpolate_curve(rate: np.ndarray, sens: np.ndarray, at: float) -> float:
    """Sensitivity at FP rate `at` on a threshold-ordered curve: linear between the last point with rate <= at
    and the next one; the last point's sensitivity beyond the end."""
    k = int(np.searchsorted(rate, at, side="right")) - 1
    if k < 0:
        return float(sens[0])
    if k >= rate.size - 1:
        return float(sens[-1])
    r0, r1 = rate[k], rate[k + 1]
    return float(sens[k] + (sens[k + 1] - sens[k]) * (at - r0) / (r1 - r0))


def _detections(det) -> np.ndarray:
    a = np.asarray(det, dtype=np.float64)
    if a.size == 0:
        return np.empty((0, 3))
    if a.ndim != 2 or a.shape[1] != 3 or not np.isfinite(a).all():
        raise UsageError(f"detections must be a finite (n, 3) array of x, y, probability; got shape {a.shape}")
    return a


def _polygons(geom: BaseGeometry) -> list[Polygon]:
    if isinstance(geom, Polygon):
        return [] if geom.is_empty else [geom]
    return [g for part in getattr(geom, "geoms", ()) for g in _polygons(part)]
