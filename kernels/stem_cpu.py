"""Fused CPU stem head (numba): the VSSM stem's first convolution, LayerNorm and GELU in one pass.

    stem_conv_norm_gelu(x, w, bias, gamma, beta, eps, out)
    x:      (batch, Cin, H, W)     float32, NCHW (the input image as the caller has it: no channels-last copy)
    w:      (Cin, 3, 3, Cout)      the Conv2d(Cin, Cout, 3, stride 2, padding 1) weight, transposed
    bias, gamma, beta: (Cout,)     the conv bias and the LayerNorm affine
    out:    (batch, Ho, Wo, Cout)  channels last, Ho = ceil(H / 2), Wo = ceil(W / 2)

Per output pixel: the 3 x 3 x Cin stride-2 convolution with zero padding (vectorised over the Cout output
channels), LayerNorm over those channels (two-pass mean and variance, biased, as torch), the affine, and the
exact (erf) GELU, written once. torch runs these as four full passes over the map (the channels-last copy of
the input, the convolution, the norm and the GELU), and its per-row LayerNorm is slow for the stem's few
channels: on micro at 2,048 px the stem took 142 ms of a 1.5 s forward, 104 ms with this kernel (docs/scan.md,
"Prefetch, huge pages, a fused stem, ...").

The erf is Press et al.'s Chebyshev fit of erfc (Numerical Recipes, `erfcc`: fractional error under 1.2e-7
everywhere) with our vectorisable exp, so the loop over channels stays SIMD.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from wsi_vssm_kernels import use_writable_numba_cache
from wsi_vssm_kernels.scan_cpu import _exp

use_writable_numba_cache(__file__)  # before the first njit(cache=True) below

FM = {"contract"}


@njit(inline="always", fastmath=FM, error_model="numpy")
def _erfc_abs(z, f):
    """erfc(z) for z >= 0 (fractional error < 1.2e-7)."""
    t = f(1.0) / (f(1.0) + f(0.5) * z)
    p = f(-1.26551223) + t * (f(1.00002368) + t * (f(0.37409196) + t * (f(0.09678418) + t * (
        f(-0.18628806) + t * (f(0.27886807) + t * (f(-1.13520398) + t * (f(1.48851587) + t * (
            f(-0.82215223) + t * f(0.17087277)))))))))
    return t * _exp(p - z * z, f)


@njit(inline="always", fastmath=FM, error_model="numpy")
def _gelu(x, f):
    """x Phi(x) = x erfc(-x / sqrt 2) / 2, from erfc of |x| / sqrt 2 (no cancellation for x < 0)."""
    e = _erfc_abs(abs(x) * f(0.7071067811865476), f)
    return f(0.5) * x * ((f(2.0) - e) if x >= f(0.0) else e)


@njit(parallel=True, cache=True, fastmath=FM, error_model="numpy")
def stem_conv_norm_gelu(x, w, bias, gamma, beta, eps, out):
    """Writes out (batch, Ho, Wo, Cout); see the module docstring."""
    batch, cin, height, width = x.shape
    _, ho, wo, cout = out.shape
    f = out.dtype.type
    for task in prange(batch * ho):  # one output row per task
        b = task // ho
        oy = task % ho
        # the row's input columns split by parity, one zero column at each end: input column 2 ox - 1 + kx is
        # odd[ox] (kx = 0), even[ox] (kx = 1), odd[ox + 1] (kx = 2), so every tap is a contiguous loop over ox
        even = np.zeros(wo, out.dtype)
        odd = np.zeros(wo + 1, out.dtype)
        acc = np.empty((cout, wo), out.dtype)
        for c in range(cout):
            for ox in range(wo):
                acc[c, ox] = bias[c]
        for ci in range(cin):
            for ky in range(3):
                iy = 2 * oy - 1 + ky
                if iy < 0 or iy >= height:
                    continue
                for ox in range(wo):
                    even[ox] = x[b, ci, iy, 2 * ox]
                for ox in range(width // 2):
                    odd[ox + 1] = x[b, ci, iy, 2 * ox + 1]
                for c in range(cout):
                    w0, w1, w2 = w[ci, ky, 0, c], w[ci, ky, 1, c], w[ci, ky, 2, c]
                    for ox in range(wo):
                        acc[c, ox] += w0 * odd[ox] + w1 * even[ox] + w2 * odd[ox + 1]
        # LayerNorm over channels and GELU, vectorised over the row's pixels
        mean = np.zeros(wo, out.dtype)
        var = np.zeros(wo, out.dtype)
        for c in range(cout):
            for ox in range(wo):
                mean[ox] += acc[c, ox]
        for ox in range(wo):
            mean[ox] /= cout
        for c in range(cout):
            for ox in range(wo):
                d = acc[c, ox] - mean[ox]
                var[ox] += d * d
        rstd = np.empty(wo, out.dtype)
        for ox in range(wo):
            rstd[ox] = f(1.0) / np.sqrt(var[ox] / cout + eps)
        for c in range(cout):
            g, be = gamma[c], beta[c]
            for ox in range(wo):
                acc[c, ox] = _gelu((acc[c, ox] - mean[ox]) * rstd[ox] * g + be, f)
        for ox in range(wo):
            for c in range(cout):
                out[b, oy, ox, c] = acc[c, ox]
