"""A slide's low-resolution layout, as geometry: tissue blobs, lesions, pen strokes and the field seeds.

Everything the renderer needs is here and small (a few kB whatever the slide size). Blobs are star-shaped:
r(theta) = radius * (1 + sum_k amp_k cos(k theta + phase_k)), so 'inside' is a cheap vectorised test and the
lesion outline written to ASAP XML is exactly the boundary the renderer draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from shapely.geometry import LineString, Polygon

# lesion diameters in um: CAMELYON16 calls < 200 um isolated cells / micro, > 2 mm macro-metastases
LESION_CLASSES_UM = {"micro": (90.0, 190.0), "small": (250.0, 1800.0), "macro": (2100.0, 3800.0)}
PEN_INKS_OD = {  # optical density per RGB channel: what each ink absorbs
    "blue": (1.15, 0.75, 0.12),
    "green": (1.0, 0.22, 0.85),
    "black": (1.35, 1.3, 1.2),
}


@dataclass(frozen=True)
class Blob:
    """A star-shaped region around (cx, cy) in level-0 px."""

    cx: float
    cy: float
    radius: float
    amps: tuple[float, ...]
    phases: tuple[float, ...]

    def radius_at(self, theta: np.ndarray) -> np.ndarray:
        r = np.ones_like(theta)
        for k, (a, p) in enumerate(zip(self.amps, self.phases, strict=True), start=2):
            r += a * np.cos(k * theta + p)
        return self.radius * r

    def signed(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Approximate signed distance in px: > 0 inside."""
        dx, dy = x - self.cx, y - self.cy
        return self.radius_at(np.arctan2(dy, dx)) - np.hypot(dx, dy)

    def polygon(self, n: int = 128, shrink: float = 0.0) -> np.ndarray:
        """(n, 2) boundary vertices (x, y), optionally pulled `shrink` px inwards."""
        theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
        r = np.maximum(self.radius_at(theta) - shrink, 1e-3)
        return np.stack([self.cx + r * np.cos(theta), self.cy + r * np.sin(theta)], axis=1)

    @property
    def reach(self) -> float:
        """Largest possible radius: bounding-box culling."""
        return self.radius * (1 + sum(abs(a) for a in self.amps))


@dataclass(frozen=True)
class PenStroke:
    points: np.ndarray  # (n, 2) polyline, level-0 px
    width: float  # px
    od: tuple[float, float, float]
    opacity: float


@dataclass(frozen=True)
class Layout:
    size: int
    mpp: float
    seed: int
    tissue: tuple[Blob, ...]
    edge_amp: float  # px: ragged tissue edges wander this far from the blob outline
    lesions: tuple[Blob, ...] = ()
    pens: tuple[PenStroke, ...] = ()
    field_seeds: dict = field(default_factory=dict)

    def px(self, um: float) -> float:
        return um / self.mpp

    def lesion_polygons(self, n: int = 96) -> list[np.ndarray]:
        return [b.polygon(n) for b in self.lesions]


def _random_blob(rng: np.random.Generator, cx: float, cy: float, radius: float, roughness: float) -> Blob:
    k = np.arange(2, 8)
    amps = rng.uniform(0.3, 1.0, k.size) * roughness / k  # smoother at high harmonics
    return Blob(
        float(cx),
        float(cy),
        float(radius),
        tuple(amps.tolist()),
        tuple(rng.uniform(0, 2 * np.pi, k.size).tolist()),
    )


def _tissue_blobs(rng: np.random.Generator, size: int) -> tuple[Blob, ...]:
    n = int(rng.integers(1, 4))
    base = {1: 0.3, 2: 0.21, 3: 0.17}[n] * size
    blobs: list[Blob] = []
    for _ in range(400):
        if len(blobs) == n:
            break
        r = base * rng.uniform(0.8, 1.1)
        blob = _random_blob(rng, 0, 0, r, roughness=0.55)
        m = blob.reach * 1.12 + 0.02 * size
        if m * 2 >= size:
            continue
        cx, cy = rng.uniform(m, size - m, 2)
        if all(np.hypot(cx - b.cx, cy - b.cy) > 0.85 * (r + b.radius) for b in blobs):
            blobs.append(Blob(cx, cy, r, blob.amps, blob.phases))
    return tuple(blobs) if blobs else (_random_blob(rng, size / 2, size / 2, 0.3 * size, 0.4),)


def _lesion_diameters(rng: np.random.Generator, mpp: float) -> list[float]:
    """1 to 3 lesions; the first one's class varies from slide to slide so a cohort spans micro to macro."""
    n = int(rng.choice([1, 1, 2, 3]))
    classes = list(LESION_CLASSES_UM)
    out = []
    for i in range(n):
        name = classes[int(rng.integers(0, 3))] if i == 0 else str(rng.choice(["micro", "small"]))
        lo, hi = LESION_CLASSES_UM[name]
        out.append(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) / mpp)
    return out


def _place_lesions(rng, tissue: tuple[Blob, ...], edge_amp: float, mpp: float) -> tuple[Blob, ...]:
    """Lesions inside tissue (inside each blob's outline pulled in past the ragged edge), not overlapping."""
    margin = edge_amp + 30.0 / mpp
    safe = [Polygon(b.polygon(256, shrink=margin)).buffer(0) for b in tissue]
    placed: list[Blob] = []
    for diameter in _lesion_diameters(rng, mpp):
        d = diameter
        for attempt in range(300):
            if attempt and attempt % 30 == 0:
                d *= 0.8  # macro lesions may not fit small tissue pieces: shrink until they do
            host = safe[int(rng.integers(0, len(safe)))]
            if host.is_empty:
                continue
            x0, y0, x1, y1 = host.bounds
            cand = _random_blob(rng, rng.uniform(x0, x1), rng.uniform(y0, y1), d / 2, roughness=0.35)
            poly = Polygon(cand.polygon(96))
            if host.contains(poly) and all(
                not poly.buffer(20 / mpp).intersects(Polygon(p.polygon(96))) for p in placed
            ):
                placed.append(cand)
                break
    if not placed:  # a blob's centre is always deep inside it: fall back to a micro-metastasis there
        host = max(tissue, key=lambda b: b.radius)
        placed.append(_random_blob(rng, host.cx, host.cy, min(60 / mpp, host.radius / 4), roughness=0.3))
    return tuple(placed)


def _pen_strokes(rng, size: int, mpp: float, lesions: tuple[Blob, ...]) -> tuple[PenStroke, ...]:
    """0 to 2 curved marker strokes on about 40% of slides, kept clear of lesions."""
    if rng.random() > 0.4:
        return ()
    lesion_polys = [Polygon(b.polygon(96)) for b in lesions]
    strokes = []
    for _ in range(int(rng.integers(1, 3))):
        for _attempt in range(50):
            p0, p2 = rng.uniform(0.05, 0.95, (2, 2)) * size
            p1 = (p0 + p2) / 2 + rng.normal(0, 0.12 * size, 2)
            t = np.linspace(0, 1, 24)[:, None]
            pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # quadratic Bezier
            width = min(rng.uniform(120, 320) / mpp, 0.06 * size)
            if np.hypot(*(p2 - p0)) < 0.15 * size:
                continue
            band = LineString(pts).buffer(width)
            if not any(band.intersects(p) for p in lesion_polys):
                ink = str(rng.choice(list(PEN_INKS_OD)))
                strokes.append(PenStroke(pts, float(width), PEN_INKS_OD[ink], float(rng.uniform(0.55, 0.9))))
                break
    return tuple(strokes)


def make_layout(size: int, mpp: float, seed: int, tumor: bool) -> Layout:
    """The whole geometry of one slide, from its seed alone."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x51DE]))
    tissue = _tissue_blobs(rng, size)
    edge_amp = 0.05 * min(b.radius for b in tissue)
    lesions = _place_lesions(rng, tissue, edge_amp, mpp) if tumor else ()
    return _finish(rng, size, mpp, seed, tissue, edge_amp, lesions)


def _finish(rng, size: int, mpp: float, seed: int, tissue, edge_amp: float, lesions) -> Layout:
    """Pen strokes and field seeds, then the layout."""
    pens = _pen_strokes(rng, size, mpp, lesions)
    names = ("edge", "fat", "lymph", "eosin", "warp", "orient", "cyto", "grain", "nuclei")
    seeds = {name: int(s) for name, s in zip(names, rng.integers(0, 2**31, len(names)), strict=True)}
    return Layout(int(size), float(mpp), int(seed), tissue, float(edge_amp), lesions, pens, seeds)


# ---- lymph-node slides with lesions of given longest diameters (synthetic patients) -------------------------
NODE_RADIUS = 0.36  # of the slide side: one large, smooth node section leaves room for a macrometastasis


def feret(points: np.ndarray) -> float:
    """Largest distance between two of the (n, 2) points."""
    p = np.asarray(points, np.float64)
    return float(np.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1).max())) if len(p) > 1 else 0.0


def lesion_blob(rng: np.random.Generator, cx: float, cy: float, diameter: float, roughness: float = 0.35) -> Blob:
    """A random lesion whose outline (the 96-vertex polygon written to ASAP XML) has longest diameter `diameter`."""
    b = _random_blob(rng, cx, cy, diameter / 2, roughness)
    return Blob(b.cx, b.cy, b.radius * diameter / feret(b.polygon(96)), b.amps, b.phases)


def _place_exact(rng, tissue: tuple[Blob, ...], edge_amp: float, mpp: float, diameters) -> tuple[Blob, ...]:
    """Lesions of exactly these longest diameters (px) inside tissue, not overlapping, largest first. The largest
    must fit (ValueError otherwise; it is never shrunk, its category must hold); a smaller one that finds no room
    beside it is left out."""
    margin = edge_amp + 30.0 / mpp
    safe = [Polygon(b.polygon(256, shrink=margin)).buffer(0) for b in tissue]
    placed: list[Blob] = []
    for k, d in enumerate(sorted(diameters, reverse=True)):
        regions = [(h, h.buffer(-0.3 * d), h.buffer(-0.15 * d)) for h in safe]  # centres away from the edge
        for attempt in range(400 if k == 0 else 100):
            host, inner, looser = regions[int(rng.integers(0, len(regions)))]
            region = next((r for r in ((inner, looser) if attempt < 200 else (looser,)) if not r.is_empty), host)
            x0, y0, x1, y1 = region.bounds
            cand = lesion_blob(rng, rng.uniform(x0, x1), rng.uniform(y0, y1), d)
            poly = Polygon(cand.polygon(96))
            if host.contains(poly) and all(
                not poly.buffer(20 / mpp).intersects(Polygon(p.polygon(96))) for p in placed
            ):
                placed.append(cand)
                break
        else:
            if k == 0:
                raise ValueError(f"a lesion {d * mpp / 1000:.2f} mm across does not fit in the tissue")
    return tuple(placed)


def make_node_layout(size: int, mpp: float, seed: int, lesion_diameters: tuple[float, ...] = ()) -> Layout:
    """A lymph-node slide: one large smooth tissue section holding lesions of exactly the given longest
    diameters (level-0 px; none for a negative node). ValueError when a lesion does not fit."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x40DE]))
    shape = _random_blob(rng, 0, 0, NODE_RADIUS * size, roughness=0.12)
    m = shape.reach * 1.05 + 0.02 * size
    cx, cy = rng.uniform(min(m, size / 2), max(size - m, size / 2), 2)
    tissue = (Blob(float(cx), float(cy), shape.radius, shape.amps, shape.phases),)
    edge_amp = 0.03 * shape.radius
    lesions = _place_exact(rng, tissue, edge_amp, mpp, lesion_diameters)
    return _finish(rng, size, mpp, seed, tissue, edge_amp, lesions)
