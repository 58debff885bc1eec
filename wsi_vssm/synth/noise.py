"""Stateless hash noise: every value is a pure function of global coordinates and a seed.

That is what makes tiles independent and seamless: a tile renders the same pixel values as its neighbour
would at the shared border, whatever order (or thread) the tiles are made in.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_KY = np.uint64(0xD1B54A32D192ED03)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_TO_UNIT = 1.0 / float(2**53)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (wrapping uint64 arithmetic)."""
    h = h ^ (h >> _S30)
    h = h * _M1
    h = h ^ (h >> _S27)
    h = h * _M2
    return h ^ (h >> _S31)


def _as_u64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.int64).view(np.uint64)


def hash_uniform(ix, iy, seed: int, channel: int = 0) -> np.ndarray:
    """Uniform floats in [0, 1) from integer lattice coordinates; `channel` gives independent streams."""
    with np.errstate(over="ignore"):
        key = np.uint64((int(seed) * 0x2545F4914F6CDD1D + channel * 0x632BE59BD9B4E019) & (2**64 - 1))
        h = _mix(_as_u64(ix) * _GOLD + key)
        h = _mix(h ^ (_as_u64(iy) * _KY))
    return (h >> np.uint64(11)).astype(np.float64) * _TO_UNIT


def value_noise(x: np.ndarray, y: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1] with features about `scale` px wide."""
    fx, fy = np.asarray(x, np.float64) / scale, np.asarray(y, np.float64) / scale
    ix, iy = np.floor(fx), np.floor(fy)
    tx, ty = fx - ix, fy - iy
    tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)  # smoothstep: no grid creases
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)
    v00 = hash_uniform(ix, iy, seed)
    v10 = hash_uniform(ix + 1, iy, seed)
    v01 = hash_uniform(ix, iy + 1, seed)
    v11 = hash_uniform(ix + 1, iy + 1, seed)
    top = v00 + (v10 - v00) * tx
    bottom = v01 + (v11 - v01) * tx
    return top + (bottom - top) * ty


def fbm(x, y, scale: float, seed: int, octaves: int = 3) -> np.ndarray:
    """Fractal sum of value noise, normalised to [0, 1]; mean 0.5, about 0.1 to 0.15 standard deviation."""
    total = np.zeros(np.broadcast(x, y).shape)
    norm = 0.0
    amp = 1.0
    for o in range(octaves):
        total += amp * value_noise(x, y, scale / 2**o, seed * 31 + o)
        norm += amp
        amp *= 0.5
    return total / norm
