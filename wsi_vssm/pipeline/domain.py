"""Is a slide like what the model was trained on? A domain check in two parts, which warns and never refuses.

- **Stain and modality** (`stain_check`), from the slide's tissue thumbnail: fluorescence (a dark background),
  IHC (no eosin, or much DAB brown) and unstained or greyscale tissue, from colour deconvolution statistics with
  the Ruifrok & Johnston haematoxylin / eosin / DAB optical-density vectors.
- **Token features** (`FeatureDomain`): the Mahalanobis distance of the slide's tissue tokens from the model's
  training tokens (mean and Ledoit-Wolf-shrunk covariance), pooled over the slide (median by default) and
  compared with a threshold set on selection data. It lives in the model file's `metadata["feature_domain"]`
  as plain lists and floats (weights-only loading allows nothing else).

`domain_verdict` combines the two into `(in_domain, domain_notes)`; `slide_domain` does all of it for one slide.
A slide without tissue cells gets the stain part only, and its notes say so. How the thresholds were chosen,
with the figures, is in docs/domain.md (`bench/domain.py` recomputes them).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from wsi_vssm.errors import WsiVssmError
from wsi_vssm.io.tissue import HED_FROM_RGB

METADATA_KEY = "feature_domain"  # where a model file's metadata keeps its FeatureDomain
DOMAIN_FORMAT = "wsi-vssm-feature-domain-1"
MIN_TOKENS = 10  # fewer tissue tokens: the slide distance is reported as rough
_MAX_PIXELS = 100_000  # stain statistics use at most about this many (block-pooled) thumbnail pixels


class FeatureDomainError(WsiVssmError):
    """A feature domain that cannot be used: bad metadata, or features of another width than it was fitted on."""


# ---- stain and modality ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StainThresholds:
    """Thresholds of `stain_check`; docs/domain.md gives the figures behind each."""

    dark_background: float = 60.0  # median brightest channel of the thumbnail (0..255) below: fluorescence
    min_od: float = 0.15  # summed RGB optical density below which a tissue-mask pixel is glass
    min_eosin_share: float = 0.06  # median eosin share of H + E + DAB in tissue below: no eosin, not H&E
    max_dab_share: float = 0.10  # share of tissue pixels that are DAB brown above: IHC
    dab_min: float = 0.3  # a DAB-brown pixel has at least this DAB concentration (OD units)...
    grey_chroma: float = 0.05  # (max - min of RGB, 0..1) below: colourless
    grey_share: float = 0.5  # colourless share of the absorbing (non-glass, non-black) pixels above: grey
    min_absorbing: float = 0.10  # ...when absorbing pixels cover at least this share of the thumbnail
    min_pixels: int = 20  # fewer stained tissue pixels: no eosin or DAB figures


STAIN = StainThresholds()


def _pixels(rgb: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(all, masked) float RGB pixels in 0..255 of an (h, w, 3|4) image, mean-pooled in b x b blocks to keep at
    most ~_MAX_PIXELS. Slide thumbnails (>= 4 um/px) come in unpooled or nearly; a full-resolution tile is pooled,
    which removes single-pixel colour fringes (JPEG, chromatic aberration) that look brown at that scale. A pooled
    pixel is tissue when at least half its block is."""
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise FeatureDomainError(f"stain check needs an H x W x 3 RGB image, got shape {a.shape}")
    m = np.zeros(a.shape[:2], bool) if mask is None else np.asarray(mask, bool)
    if m.shape != a.shape[:2]:
        raise FeatureDomainError(f"tissue mask {m.shape} does not match the thumbnail {a.shape[:2]}")
    b = max(1, math.ceil(math.sqrt(a.shape[0] * a.shape[1] / _MAX_PIXELS)))
    h, w = a.shape[0] // b * b, a.shape[1] // b * b
    if h == 0 or w == 0:  # smaller than one block: no pooling
        b, h, w = 1, a.shape[0], a.shape[1]
    px = a[:h, :w, :3].astype(np.float64).reshape(h // b, b, w // b, b, 3).mean(axis=(1, 3))
    pm = m[:h, :w].reshape(h // b, b, w // b, b).mean(axis=(1, 3)) >= 0.5
    return px.reshape(-1, 3), px[pm]


def _od(px: np.ndarray) -> np.ndarray:
    """(n, 3) RGB 0..255 -> (n, 3) optical density (white = 255)."""
    return -np.log(np.maximum(px, 1.0) / 255.0)


def stain_stats(thumbnail_rgb: np.ndarray, tissue_mask: np.ndarray | None,
                thresholds: StainThresholds = STAIN) -> dict:
    """The colour-deconvolution figures `stain_check` judges (plain floats; NaN where there are too few pixels):

    - `background`: median of the brightest RGB channel over the whole thumbnail (glass is bright in
      brightfield, black in fluorescence);
    - `tissue_pixels`: tissue-mask pixels that absorb (summed OD >= `min_od`);
    - `eosin_share`: median over those of eosin / (H + E + DAB), concentrations clipped at 0;
    - `dab_share`: share of those where DAB dominates: at least `dab_min` of DAB and the pixel absorbs more blue
      than green (DAB's OD has blue 0.78 > green 0.57; haematoxylin's and eosin's have green far above blue);
    - `absorbing`: share of the thumbnail that is neither glass nor black, relative to the brightest glass;
    - `grey_share`: colourless share (chroma < `grey_chroma`) of those absorbing pixels.
    """
    t = thresholds
    allpx, tissue = _pixels(thumbnail_rgb, tissue_mask)
    brightest = allpx.max(axis=1)
    out = {"background": float(np.median(brightest)) if len(allpx) else math.nan}
    od = _od(tissue)
    stained = od[od.sum(axis=1) >= t.min_od]
    out["tissue_pixels"] = len(stained)
    if len(stained) >= t.min_pixels:
        h, e, d = np.clip(stained @ HED_FROM_RGB, 0, None).T
        out["eosin_share"] = float(np.median(e / np.maximum(h + e + d, 1e-6)))
        out["dab_share"] = float(np.mean((d >= t.dab_min) & (stained[:, 2] > stained[:, 1])))
    else:
        out["eosin_share"] = out["dab_share"] = math.nan
    white = max(float(np.percentile(brightest, 99)), 1.0) if len(allpx) else 255.0
    rel_od = -np.log(np.clip(allpx / white, 1 / 255, 1.0)).sum(axis=1)
    absorbing = (rel_od >= 2 * t.min_od) & (brightest >= 50)
    out["absorbing"] = float(absorbing.mean()) if len(allpx) else 0.0
    chroma = (allpx.max(axis=1) - allpx.min(axis=1)) / 255.0
    out["grey_share"] = float(np.mean(chroma[absorbing] < t.grey_chroma)) if absorbing.any() else math.nan
    return out


def stain_check(thumbnail_rgb: np.ndarray, tissue_mask: np.ndarray | None,
                thresholds: StainThresholds = STAIN) -> list[str]:
    """Notes on why a slide does not look like brightfield H&E; empty when it does (or when there is too
    little tissue to tell, and nothing else is wrong). `tissue_mask` is the thumbnail's tissue mask (None:
    no tissue)."""
    return stain_notes(stain_stats(thumbnail_rgb, tissue_mask, thresholds), thresholds)


def patches_stain_check(patches: list[np.ndarray], side: int = 96) -> list[str]:
    """`stain_check` of a patch folder: up to 256 patches (H x W x 3 uint8, cropped to `side` px) tiled into one
    image, every patch pixel counted as tissue (a patch is a tissue crop; glass in it is left out by its OD)."""
    if not patches:
        return []
    n = math.ceil(math.sqrt(len(patches)))
    montage = np.full((n * side, n * side, 3), 255, np.uint8)
    mask = np.zeros(montage.shape[:2], bool)
    for k, img in enumerate(patches):
        crop = np.asarray(img)[:side, :side, :3]
        y, x = k // n * side, k % n * side
        montage[y:y + crop.shape[0], x:x + crop.shape[1]] = crop
        mask[y:y + crop.shape[0], x:x + crop.shape[1]] = True
    return stain_check(montage, mask)


def stain_judged(stats: dict, thresholds: StainThresholds = STAIN) -> bool:
    """Whether `stain_stats` saw enough to judge the stain: a dark (fluorescence) background, or enough
    absorbing tissue pixels for the deconvolution."""
    return stats["background"] < thresholds.dark_background or stats["tissue_pixels"] >= thresholds.min_pixels


FLUORESCENCE_NOTE = "looks like fluorescence"  # how the fluorescence note begins (the overlay's stamp reads it)


def stain_notes(s: dict, thresholds: StainThresholds = STAIN) -> list[str]:
    """`stain_check`'s notes from `stain_stats`' figures."""
    t = thresholds
    if s["background"] < t.dark_background:
        return [f"{FLUORESCENCE_NOTE} (dark background: median brightness {s['background']:.0f} of 255), "
                "not brightfield H&E"]
    notes = []
    if s["eosin_share"] < t.min_eosin_share:
        notes.append(f"no eosin (median eosin share {s['eosin_share']:.2f} < {t.min_eosin_share}): looks like "
                     "IHC or a haematoxylin-only stain, not H&E")
    if s["dab_share"] > t.max_dab_share:
        notes.append(f"looks like IHC: DAB brown in {s['dab_share']:.0%} of tissue pixels, not H&E")
    if s["absorbing"] >= t.min_absorbing and s["grey_share"] > t.grey_share:
        notes.append(f"looks unstained or greyscale ({s['grey_share']:.0%} of non-glass pixels are colourless)")
    return notes


# ---- token features ---------------------------------------------------------------------------------------
def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(covariance (F, F), shrinkage in [0, 1]) of (n, F) samples: the Ledoit-Wolf (2004) shrinkage of the
    sample covariance towards mu * I (mu: the mean variance), with the shrinkage estimated from the data."""
    x = np.asarray(x, np.float64)
    n, p = x.shape
    xc = x - x.mean(axis=0)
    emp = xc.T @ xc / n
    mu = float(np.trace(emp)) / p
    x2 = xc * xc
    beta_ = float((x2.T @ x2).sum()) / n  # sum_ij mean_k x_ki^2 x_kj^2
    delta_ = float((emp * emp).sum())
    beta = (beta_ - delta_) / (p * n)
    delta = (delta_ - 2 * mu * float(np.trace(emp)) + p * mu * mu) / p
    shrink = 0.0 if delta <= 0 else min(max(beta, 0.0), delta) / delta
    return (1 - shrink) * emp + shrink * mu * np.eye(p), shrink


@dataclass
class FeatureDomain:
    """Where a model's training token features lie: their mean and shrunk inverse covariance, and the slide
    distance above which a slide is out of domain. `statistic` pools a slide's per-token Mahalanobis distances:
    "median" or "pNN" (a percentile, e.g. "p90")."""

    mean: np.ndarray  # (F,)
    precision: np.ndarray  # (F, F) inverse of the shrunk covariance
    threshold: float = math.inf
    statistic: str = "median"
    info: dict = field(default_factory=dict)  # plain data: shrinkage, n_train, source, model_weights_hash, how set

    def __post_init__(self):
        self.mean = np.asarray(self.mean, np.float64).reshape(-1)
        self.precision = np.asarray(self.precision, np.float64)
        f = len(self.mean)
        if f == 0 or self.precision.shape != (f, f) or not np.isfinite(self.precision).all():
            raise FeatureDomainError(f"feature domain needs a mean (F,) and a finite precision (F, F); got "
                                     f"{self.mean.shape} and {self.precision.shape}")
        if not (isinstance(self.threshold, (int, float)) and self.threshold > 0):
            raise FeatureDomainError(f"feature domain threshold must be a positive number, got {self.threshold!r}")
        _pool(np.zeros(1), self.statistic)  # rejects an unknown statistic

    @classmethod
    def fit(cls, features: np.ndarray, statistic: str = "median", ridge: float | None = None,
            **info) -> FeatureDomain:
        """From (n, F) training token features. `ridge` None: Ledoit-Wolf shrinkage; else that fixed shrinkage."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or len(x) < 2 or not np.isfinite(x).all():
            raise FeatureDomainError(f"need (n >= 2, F) finite training features, got shape {x.shape}")
        if ridge is None:
            cov, shrink = ledoit_wolf(x)
        else:
            xc = x - x.mean(axis=0)
            emp = xc.T @ xc / len(x)
            shrink = float(ridge)
            cov = (1 - shrink) * emp + shrink * np.trace(emp) / x.shape[1] * np.eye(x.shape[1])
        info = {"shrinkage": float(shrink), "n_train": len(x), **info}
        return cls(x.mean(axis=0), np.linalg.inv(cov), statistic=statistic, info=info)

    @property
    def width(self) -> int:
        return len(self.mean)

    def token_distances(self, features: np.ndarray) -> np.ndarray:
        """(n, F) token features -> (n,) Mahalanobis distances from the training mean."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.width:
            raise FeatureDomainError(f"features of shape {x.shape} do not fit this feature domain (F = "
                                     f"{self.width}): it belongs to another model")
        out = np.empty(len(x))
        for s in range(0, len(x), 8192):  # chunks: a slide may have 10^5 tokens
            d = x[s:s + 8192] - self.mean
            out[s:s + 8192] = ((d @ self.precision) * d).sum(axis=1)
        return np.sqrt(np.maximum(out, 0.0))

    def slide_distance(self, features: np.ndarray) -> float:
        """The slide's pooled distance (`statistic` of its tokens' distances); NaN without tokens."""
        d = self.token_distances(features)
        return _pool(d, self.statistic) if len(d) else math.nan

    def check(self, features: np.ndarray) -> tuple[bool, list[str]]:
        """(in_domain, notes) of a slide's (n, F) tissue token features; no tokens: in domain, with a note."""
        return self.check_distance(self.slide_distance(features), len(features))

    def check_distance(self, dist: float, n_tokens: int | None = None) -> tuple[bool, list[str]]:
        """`check` from a slide distance already computed (NaN: no tokens) over `n_tokens` tokens."""
        if math.isnan(dist):
            return True, ["no tissue tokens: token features not checked"]
        few = n_tokens is not None and n_tokens < MIN_TOKENS
        rough = f" (only {n_tokens} tissue token{'' if n_tokens == 1 else 's'}: a rough figure)" if few else ""
        if dist > self.threshold:
            return False, [f"tissue unlike the training data: token feature distance {dist:.2f} > threshold "
                           f"{self.threshold:.2f} ({self.statistic} Mahalanobis distance){rough}"]
        return True, [f"token feature distance {dist:.1f}{rough}"] if few else []

    def to_metadata(self) -> dict:
        """Plain lists, floats and strings, for a model file's `metadata[METADATA_KEY]` or a JSON file."""
        return {"format": DOMAIN_FORMAT, "mean": [float(v) for v in self.mean],
                "precision": [[float(f"{v:.7g}") for v in row] for row in self.precision],
                "threshold": float(self.threshold), "statistic": self.statistic, "info": dict(self.info)}

    @classmethod
    def from_metadata(cls, meta: dict) -> FeatureDomain:
        if not isinstance(meta, dict) or meta.get("format") != DOMAIN_FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise FeatureDomainError(f"not a feature domain (format {got!r}, expected {DOMAIN_FORMAT!r})")
        try:
            return cls(meta["mean"], meta["precision"], float(meta["threshold"]), str(meta["statistic"]),
                       dict(meta.get("info") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise FeatureDomainError(f"bad feature domain metadata: {e}") from e

    @classmethod
    def from_model(cls, model) -> FeatureDomain | None:
        """The feature domain in a loaded model's metadata, or None when its file has none."""
        meta = (getattr(model, "metadata", None) or {}).get(METADATA_KEY)
        return None if meta is None else cls.from_metadata(meta)

    def save_json(self, path) -> None:
        from wsi_vssm.atomic import atomic_write_json

        atomic_write_json(path, self.to_metadata())

    @classmethod
    def load_json(cls, path) -> FeatureDomain:
        import json

        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_metadata(json.load(f))
        except (OSError, ValueError) as e:
            raise FeatureDomainError(f"cannot read feature domain {path}: {e}") from e


def _pool(d: np.ndarray, statistic: str) -> float:
    if statistic == "median":
        return float(np.median(d))
    if statistic.startswith("p") and statistic[1:].isdigit() and 0 <= int(statistic[1:]) <= 100:
        return float(np.percentile(d, int(statistic[1:])))
    raise FeatureDomainError(f"unknown slide statistic {statistic!r}; valid: 'median' or 'p0'..'p100'")


# ---- verdict ---------------------------------------------------------------------------------------------
NOT_CHECKED = "token features not checked (no tissue tokens, or no feature domain)"
NO_TOKENS = "token features not checked (no tissue tokens)"
NO_FEATURE_DOMAIN = "token features not checked (this model has no feature domain: docs/domain.md)"


def domain_verdict(stain: list[str], feature_result: tuple[bool, list[str]] | None,
                   stain_was_judged: bool = True, why: str = NOT_CHECKED) -> tuple[bool, list[str]]:
    """(in_domain, domain_notes) from `stain_check`'s notes and `FeatureDomain.check`'s result (None: no tissue
    tokens, or no feature domain for this model; the notes say the stain alone was judged, or that nothing was
    when `stain_was_judged` is false: too little tissue on the thumbnail). Any stain note or a feature distance
    over the threshold makes the slide out of domain: a warning, never a refusal."""
    notes = list(stain)
    if feature_result is None:
        if not stain_was_judged:
            return not notes, notes + [f"{why}, and too little tissue on the thumbnail to judge the stain: "
                                       "not checked"]
        return not notes, notes + [f"{why}: judged on the stain only"]
    ok, fnotes = feature_result
    return bool(ok) and not notes, notes + list(fnotes)




# read within this factor of the model's resolution (either way), or enlarged by at most it: the same
# magnification (beyond it, an enlargement is also warned about before the slide runs: geometry.check_enlargement)
MPP_TOLERANCE = 1.25


def magnification_check(analysis_mpp: float | None, model_mpp: float | None,
                        slide_mpp: float | None = None) -> list[str]:
    """Notes when the slide was read at another resolution than the model's (`--target-mpp`): cells and lesions
    change scale and the calibration no longer holds; and when its scan (`slide_mpp`, level 0) is coarser than
    the resolution it was read at: the pixels were enlarged and lack the detail the model learnt from. The token
    features need not show either (2 um/px on the sample mosaic stayed under the distance threshold and called
    its lesion normal)."""
    notes = []
    if analysis_mpp and model_mpp and not 1 / MPP_TOLERANCE <= analysis_mpp / model_mpp <= MPP_TOLERANCE:
        notes.append(f"read at {analysis_mpp:.3g} um/px, {analysis_mpp / model_mpp:.2g}x the model's "
                     f"{model_mpp:.3g} um/px (--target-mpp): another magnification than it was trained at")
    if analysis_mpp and slide_mpp and slide_mpp / analysis_mpp > MPP_TOLERANCE:
        notes.append(f"scanned at {slide_mpp:.3g} um/px, coarser than the {analysis_mpp:.3g} um/px it was read at: "
                     f"enlarged {slide_mpp / analysis_mpp:.2g}x, without the detail the model was trained on")
    return notes


def slide_domain(thumbnail_rgb: np.ndarray, tissue_mask: np.ndarray | None, features: np.ndarray | None,
                 domain: FeatureDomain | None, analysis_mpp: float | None = None,
                 model_mpp: float | None = None, slide_mpp: float | None = None) -> dict:
    """{"in_domain", "domain_notes", "domain_distance", "domain_threshold"} for one slide: the stain check on its
    tissue thumbnail and mask, the feature check on its (n, F) tissue token features (None or n = 0: no tissue
    tokens) against `domain` (None: the model has none), and the resolution the slide was read at against the
    model's and the slide's scan (`magnification_check`, when given). `domain_distance` (and `domain_threshold`, the
    model's) is None where not measured."""
    stats = stain_stats(thumbnail_rgb, tissue_mask)
    stain = stain_notes(stats) + magnification_check(analysis_mpp, model_mpp, slide_mpp)
    has_tokens = features is not None and len(features) > 0
    if domain is None or not has_tokens:
        why = NO_FEATURE_DOMAIN if domain is None else NO_TOKENS
        in_domain, notes = domain_verdict(stain, None, stain_judged(stats), why)
        threshold = None if domain is None else round(float(domain.threshold), 3)
        return {"in_domain": in_domain, "domain_notes": notes, "domain_distance": None, "domain_threshold": threshold}
    dist = domain.slide_distance(features)
    in_domain, notes = domain_verdict(stain, domain.check_distance(dist, len(features)))
    return {"in_domain": in_domain, "domain_notes": notes, "domain_distance": round(dist, 3),
            "domain_threshold": round(float(domain.threshold), 3)}


DEFAULT_DOMAIN_JSON = "default_domain.json"  # beside the packaged default weights (bench/domain.py writes it)


def model_domain(model, weights_hash: str | None = None) -> FeatureDomain | None:
    """The feature domain of `model`: its model file's (metadata `feature_domain`), else the packaged one when
    `model` has the default model's weights (matched by weights hash; pass `weights_hash` when the caller has
    it, to spare hashing the weights again) or its backbone (the token features the domain measures are the
    backbone's: a MIL head trained on them and attached keeps the domain), else None (the stain check alone)."""
    from wsi_vssm.models.model_file import state_dict_hash

    own = FeatureDomain.from_model(model)
    if own is not None:
        return own
    packaged = _packaged_domain()
    if packaged is None:
        return None
    if weights_hash is None:
        weights_hash = state_dict_hash(model.state_dict())
    if packaged.info.get("model_weights_hash") == weights_hash:
        return packaged
    backbone = getattr(model, "backbone", None)
    same = backbone is not None and _packaged_backbone_hash() == state_dict_hash(backbone.state_dict())
    return packaged if same else None


@functools.cache
def _packaged_backbone_hash() -> str | None:
    """The backbone weights hash of the packaged model the packaged domain was fitted on (None when the packaged
    model file is missing or is not that model)."""
    from wsi_vssm.models.model_file import default_model_path, state_dict_hash
    from wsi_vssm.models.slide_model import load_model

    packaged, path = _packaged_domain(), default_model_path()
    if packaged is None or not path.is_file():
        return None
    model = load_model(path)
    if state_dict_hash(model.state_dict()) != packaged.info.get("model_weights_hash"):
        return None
    return state_dict_hash(model.backbone.state_dict())


@functools.cache
def _packaged_domain() -> FeatureDomain | None:
    from importlib import resources

    path = resources.files("wsi_vssm") / "weights" / DEFAULT_DOMAIN_JSON
    return FeatureDomain.load_json(str(path)) if path.is_file() else None
