"""Procedural H&E texture: one 256 px tile at a time, from the slide's layout alone.

Per tile: smooth fields (tissue, lesion, fat, lymphoid density, eosin, fibre warp, pen ink) are evaluated on a
coarse grid of global nodes with numpy; nuclei and adipocytes come from jittered global cell grids, one random
point per cell, hashed from the cell index. A numba kernel then shades every pixel by Beer-Lambert stain
mixing (optical density = h * haematoxylin + e * eosin). Nothing depends on the tile except through global
coordinates, so tiles are seamless and can be made in any order, on any thread.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from wsi_vssm_kernels import use_writable_numba_cache

from wsi_vssm.synth.layout import Layout
from wsi_vssm.synth.noise import fbm, hash_uniform

use_writable_numba_cache(__file__)  # before the first njit(cache=True) below

STEP = 16  # coarse field grid spacing (px); all fields are smooth at this scale
# stain optical-density directions (RGB), as in colour deconvolution of H&E
HAEM = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
EOSIN = np.array([0.13, 0.87, 0.48]) / np.linalg.norm([0.13, 0.87, 0.48])  # pink, a little towards red
BACKGROUND_OD = 0.035  # scanner white is a light grey, about 232
# field rows in the coarse grid
T, L, FAT, LYM, EOS, WARP, ORI, CYTO, PEN = range(9)  # PEN takes 3 rows (RGB optical density)
N_FIELDS = PEN + 3

# nuclei populations: cell size (um: one candidate nucleus per cell), semi-axes (um), haematoxylin, eosin
NUCLEI = {
    "stroma": dict(cell=15.0, a=(3.2, 4.8), ratio=(0.3, 0.45), h=(0.85, 1.15), e=0.18, rim=0.1, channel=10),
    "lymph": dict(cell=7.2, a=(2.3, 2.9), ratio=(0.85, 1.0), h=(1.7, 2.1), e=0.1, rim=0.0, channel=20),
    "tumor": dict(cell=11.5, a=(3.9, 6.8), ratio=(0.6, 0.95), h=(1.35, 2.05), e=0.2, rim=0.45, channel=30),
}
FAT_CELL_UM = 62.0


def _smoothstep(a, b, x):
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _near(x, y, cx: float, cy: float, reach: float) -> bool:
    return x.min() - reach <= cx <= x.max() + reach and y.min() - reach <= cy <= y.max() + reach


def tissue_field(layout: Layout, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (px, > 0 inside) to the ragged tissue edge, at any points."""
    out = np.full(np.shape(x), -1e4)
    near = [b for b in layout.tissue if _near(x, y, b.cx, b.cy, b.reach + 2 * layout.edge_amp)]
    for b in near:
        out = np.maximum(out, b.signed(x, y))
    if near:
        ragged = fbm(x, y, max(layout.px(90), 24.0), layout.field_seeds["edge"], octaves=2) * 2 - 1
        out = out + layout.edge_amp * 2.2 * ragged
    return out


def lesion_field(layout: Layout, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (px, > 0 inside) to the nearest lesion outline (exactly the ASAP polygon)."""
    out = np.full(np.shape(x), -1e4)
    for b in layout.lesions:
        if _near(x, y, b.cx, b.cy, b.reach):
            out = np.maximum(out, b.signed(x, y))
    return out


def _pen_od(layout: Layout, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    od = np.zeros((3, *np.shape(x)))
    for s in layout.pens:
        lo, hi = s.points.min(0) - s.width, s.points.max(0) + s.width
        if x.max() < lo[0] or x.min() > hi[0] or y.max() < lo[1] or y.min() > hi[1]:
            continue
        a, b = s.points[:-1], s.points[1:]
        p = np.stack([x.ravel(), y.ravel()], 1)[:, None, :]
        ab = b - a
        t = np.clip(((p - a) * ab).sum(-1) / (ab * ab).sum(-1), 0, 1)
        dist = np.linalg.norm(p - (a + t[..., None] * ab), axis=-1).min(1).reshape(np.shape(x))
        alpha = np.clip((s.width / 2 - dist) / 6.0 + 0.5, 0, 1) * s.opacity
        od += alpha * np.asarray(s.od)[:, None, None]
    return od


def coarse_fields(layout: Layout, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """All smooth fields at grid nodes (2-D arrays gx, gy): float32 (N_FIELDS, *gx.shape)."""
    f = np.zeros((N_FIELDS, *gx.shape), np.float32)
    s, px = layout.field_seeds, layout.px
    f[T] = tissue_field(layout, gx, gy)
    f[PEN:] = _pen_od(layout, gx, gy)
    if f[T].max() < -STEP:  # background only: the rest is never looked at
        return f
    f[L] = lesion_field(layout, gx, gy)
    lesion_w = _smoothstep(-px(15), px(15), f[L])
    f[FAT] = _smoothstep(0.595, 0.605, fbm(gx, gy, px(700), s["fat"])) * (1 - lesion_w)
    lym = _smoothstep(0.6, 0.68, fbm(gx, gy, px(450), s["lymph"]))
    f[LYM] = lym * (1 - lesion_w) * (1 - f[FAT])
    f[EOS] = 0.6 + 0.7 * (fbm(gx, gy, px(300), s["eosin"], 2) - 0.5)
    f[WARP] = 16.0 * fbm(gx, gy, px(45), s["warp"], 3)
    f[ORI] = _smoothstep(0.4, 0.6, fbm(gx, gy, px(220), s["orient"], 1))
    f[CYTO] = fbm(gx, gy, px(18), s["cyto"], 2)  # also breaks fibres up
    return f


def _bilinear(f: np.ndarray, gx0: int, gy0: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample coarse fields (rows) at points (x, y) in global px; the grid's node (0, 0) is at (gx0, gy0)."""
    u, v = (x - gx0) / STEP, (y - gy0) / STEP
    i, j = np.floor(u).astype(int), np.floor(v).astype(int)
    i, j = np.clip(i, 0, f.shape[-1] - 2), np.clip(j, 0, f.shape[-2] - 2)
    tu, tv = u - i, v - j
    top = f[:, j, i] * (1 - tu) + f[:, j, i + 1] * tu
    bottom = f[:, j + 1, i] * (1 - tu) + f[:, j + 1, i + 1] * tu
    return top * (1 - tv) + bottom * tv


def _nuclei(layout: Layout, kind: str, x0: int, y0: int, ts: int, f, gx0: int, gy0: int):
    """One candidate nucleus per global cell around the tile: (10, ny, nx) float32, see _splat_nuclei."""
    spec = NUCLEI[kind]
    cs = layout.px(spec["cell"])
    ci = np.arange(math.floor(x0 / cs) - 1, math.floor((x0 + ts) / cs) + 2)
    cj = np.arange(math.floor(y0 / cs) - 1, math.floor((y0 + ts) / cs) + 2)
    ii, jj = np.meshgrid(ci, cj)
    seed, ch = layout.field_seeds["nuclei"], spec["channel"]

    def r(k):
        return hash_uniform(ii, jj, seed, ch + k)

    cx, cy = (ii + 0.15 + 0.7 * r(0)) * cs, (jj + 0.15 + 0.7 * r(1)) * cs
    t, les, fat, lym = _bilinear(f[[T, L, FAT, LYM]], gx0, gy0, cx.ravel(), cy.ravel()).reshape(4, *cx.shape)
    in_les = les > 0
    if kind == "stroma":
        prob = np.where(in_les, 0.0, 0.24 * (1 - fat) + 0.04 * fat) * (1 - lym)
    elif kind == "lymph":
        prob = np.where(in_les, 0.0, (0.03 + 0.9 * lym) * (1 - fat))
    else:
        prob = np.where(in_les, 0.88, 0.0)
    present = (r(2) < prob) & (t > 2)
    a = layout.px(spec["a"][0] + (spec["a"][1] - spec["a"][0]) * r(3) ** 1.5)
    b = a * (spec["ratio"][0] + (spec["ratio"][1] - spec["ratio"][0]) * r(4))
    ang = r(5) * np.pi
    h = spec["h"][0] + (spec["h"][1] - spec["h"][0]) * r(6)
    p = np.stack(
        [
            cx,
            cy,
            1 / a,
            1 / b,
            np.cos(ang),
            np.sin(ang),
            h,
            np.full_like(h, spec["e"]),
            present.astype(float),
            np.full_like(h, spec["rim"]),
        ]
    ).astype(np.float32)
    return p


def _fat_points(layout: Layout, x0: int, y0: int, ts: int):
    cs = layout.px(FAT_CELL_UM)
    ci = np.arange(math.floor(x0 / cs) - 1, math.floor((x0 + ts) / cs) + 2)
    cj = np.arange(math.floor(y0 / cs) - 1, math.floor((y0 + ts) / cs) + 2)
    ii, jj = np.meshgrid(ci, cj)
    seed = layout.field_seeds["fat"]
    pts = np.stack(
        [
            (ii + 0.1 + 0.8 * hash_uniform(ii, jj, seed, 1)) * cs,
            (jj + 0.1 + 0.8 * hash_uniform(ii, jj, seed, 2)) * cs,
        ]
    ).astype(np.float32)
    return pts, int(ci[0]), int(cj[0]), float(cs)


def _stain(layout: Layout) -> np.ndarray:
    """Per-slide stain vectors scaled a little (staining varies between slides, as between centres)."""
    rng = np.random.default_rng(np.random.SeedSequence([layout.seed, 0x57A1]))
    return np.stack([HAEM * rng.uniform(0.85, 1.1), EOSIN * rng.uniform(0.85, 1.15)]).astype(np.float32)


def render_tile(layout: Layout, x0: int, y0: int, ts: int = 256) -> np.ndarray:
    """RGB uint8 (ts, ts, 3) of the level-0 box starting at global (x0, y0)."""
    margin = STEP * (2 + math.ceil(layout.px(NUCLEI["stroma"]["cell"]) / STEP))
    gx0, gy0 = (x0 - margin) // STEP * STEP, (y0 - margin) // STEP * STEP
    n = (ts + 2 * margin) // STEP + 2
    gy, gx = np.mgrid[0:n, 0:n] * STEP
    f = coarse_fields(layout, gx + gx0, gy + gy0)
    seed = layout.field_seeds["grain"]
    out = np.empty((ts, ts, 3), np.uint8)
    nuc = np.zeros((3, ts, ts), np.float32)
    stain = _stain(layout)
    fibre = np.array([2 * np.pi / layout.px(7.0), layout.seed % 180 * np.pi / 180], np.float64)
    if f[T].max() < -STEP:  # no tissue: background (and perhaps ink) only
        _shade(
            out,
            x0,
            y0,
            f,
            gx0,
            gy0,
            STEP,
            seed,
            stain,
            fibre,
            nuc,
            np.zeros((2, 1, 1), np.float32),
            0,
            0,
            1.0,
            1.0,
        )
        return out
    for kind in NUCLEI:
        _splat_nuclei(nuc, x0, y0, _nuclei(layout, kind, x0, y0, ts, f, gx0, gy0))
    fat = _fat_points(layout, x0, y0, ts)
    _shade(out, x0, y0, f, gx0, gy0, STEP, seed, stain, fibre, nuc, *fat, max(1.2, layout.px(1.3)))
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _clamp01(v):
    return min(max(v, 0.0), 1.0)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _splat_nuclei(buf, x0, y0, p):
    """Draw nuclei into buf (3, ts, ts) = [alpha, h, e]; where they overlap, the more opaque one wins."""
    ts = buf.shape[1]
    for j in range(p.shape[1]):
        for i in range(p.shape[2]):
            if p[8, j, i] == 0:
                continue
            cx, cy, reach = p[0, j, i] - x0, p[1, j, i] - y0, 1.1 / p[2, j, i] + 1.0  # a: the long semi-axis
            for yy in range(max(0, int(cy - reach)), min(ts, int(cy + reach) + 1)):
                for xx in range(max(0, int(cx - reach)), min(ts, int(cx + reach) + 1)):
                    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
                    u = (dx * p[4, j, i] + dy * p[5, j, i]) * p[2, j, i]
                    v = (-dx * p[5, j, i] + dy * p[4, j, i]) * p[3, j, i]
                    q = u * u + v * v
                    alpha = min(max((1.1 - q) * 5.0, 0.0), 1.0)
                    if alpha > buf[0, yy, xx]:
                        buf[0, yy, xx] = alpha
                        # vesicular nuclei: chromatin pushed to the rim; the centre stays paler
                        buf[1, yy, xx] = p[6, j, i] * (1.0 - p[9, j, i] * (1.0 - q) * 0.6)
                        buf[2, yy, xx] = p[7, j, i]


@numba.njit(cache=True, nogil=True, inline="always")
def _grain(x, y, seed):
    """Per-pixel white noise in [-1, 1) from a 32-bit integer hash of the global pixel."""
    h = (x * 374761393 + y * 668265263 + seed * 2246822519) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return h / 2147483648.0 - 1.0


@numba.njit(cache=True, nogil=True)
def _fat_rim(px, py, pts, ci0, cj0, cs):
    """Worley F2 - F1: small along the borders between neighbouring adipocytes."""
    ci, cj = int(math.floor(px / cs)) - ci0, int(math.floor(py / cs)) - cj0
    f1, f2 = 1e9, 1e9
    for dj in range(-1, 2):
        for di in range(-1, 2):
            j, i = cj + dj, ci + di
            if j < 0 or i < 0 or j >= pts.shape[1] or i >= pts.shape[2]:
                continue
            d = math.hypot(px - pts[0, j, i], py - pts[1, j, i])
            if d < f1:
                f1, f2 = d, f1
            elif d < f2:
                f2 = d
    return (f2 - f1) * 0.5


@numba.njit(cache=True, nogil=True, inline="always")
def _bil(f, k, i, j, tu, tv):
    top = f[k, j, i] * (1 - tu) + f[k, j, i + 1] * tu
    return top * (1 - tv) + (f[k, j + 1, i] * (1 - tu) + f[k, j + 1, i + 1] * tu) * tv


@numba.njit(cache=True, nogil=True)
def _stroma(px, py, f, i, j, tu, tv, fibre, g1, g2):
    """Haematoxylin and eosin of the fibrous pink stroma (slightly purple in lymphoid areas)."""
    eos, warp, ori, lym = (
        _bil(f, EOS, i, j, tu, tv),
        _bil(f, WARP, i, j, tu, tv),
        _bil(f, ORI, i, j, tu, tv),
        _bil(f, LYM, i, j, tu, tv),
    )
    k, ang = fibre[0], fibre[1]
    # wavy collagen bundles in two directions, blended by a slowly varying weight
    fa = 0.5 + 0.5 * math.sin(k * (px * math.cos(ang) + py * math.sin(ang)) + warp)
    fb = 0.5 + 0.5 * math.sin(k * (px * math.cos(ang + 1.2) + py * math.sin(ang + 1.2)) + 1.3 * warp)
    fib = ori * fa * fa * fa + (1 - ori) * fb * fb * fb
    gaps = _clamp01((_bil(f, CYTO, i, j, tu, tv) - 0.3) * 3.0)  # pale clefts between bundles
    e = eos * (0.25 + 0.9 * fib * gaps + 0.2 * gaps) * (1 + 0.15 * g1) * (1 - 0.45 * lym)
    h = 0.06 * (1 + 0.3 * g2) + 0.16 * lym
    return h, e


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _shade(out, x0, y0, f, gx0, gy0, step, seed, stain, fibre, nuc, fat, fi0, fj0, fcs, rimw):
    """Shade every pixel of `out` (ts, ts, 3) from coarse fields, splatted nuclei and adipocyte points."""
    for yy in range(out.shape[0]):
        py = y0 + yy + 0.5
        v = (py - gy0) / step
        j = int(v)
        tv = v - j
        for xx in range(out.shape[1]):
            px = x0 + xx + 0.5
            u = (px - gx0) / step
            i = int(u)
            tu = u - i
            g1, g2 = _grain(x0 + xx, y0 + yy, seed), _grain(x0 + xx, y0 + yy, seed + 1)
            tissue = _clamp01(_bil(f, T, i, j, tu, tv) / 3.0 + 0.5)
            h = 0.0
            e = 0.0
            if tissue > 0:
                h, e = _stroma(px, py, f, i, j, tu, tv, fibre, g1, g2)
                fat_w = _bil(f, FAT, i, j, tu, tv)
                if fat_w > 0:  # adipocytes: empty vacuoles with thin pink membranes
                    rim = _clamp01(1.0 - (_fat_rim(px, py, fat, fi0, fj0, fcs) - rimw) / 1.2)
                    h += (0.04 * rim - h) * fat_w
                    e += (0.6 * rim * (1 + 0.1 * g1) - e) * fat_w
                les = _clamp01(_bil(f, L, i, j, tu, tv) / 3.0 + 0.5)
                if les > 0:  # tumour cells' amphophilic cytoplasm, mottled
                    cyto = _bil(f, CYTO, i, j, tu, tv)
                    h += (0.16 + 0.1 * cyto + 0.04 * g2 - h) * les
                    e += (0.45 + 0.25 * cyto - e) * les
                a = nuc[0, yy, xx]
                if a > 0:
                    h += (nuc[1, yy, xx] * (1 + 0.15 * g2) - h) * a
                    e += (nuc[2, yy, xx] - e) * a
                h *= tissue
                e *= tissue
            bg = BACKGROUND_OD * (1 + 0.25 * g1)
            for c in range(3):
                od = bg + h * stain[0, c] + e * stain[1, c] + _bil(f, PEN + c, i, j, tu, tv) * (1 + 0.1 * g1)
                out[yy, xx, c] = np.uint8(min(255.0, 255.0 * math.exp(-od) + 0.5))
