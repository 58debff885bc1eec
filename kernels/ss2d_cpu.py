"""Fused CPU SS2D scan (numba): the four scan directions of a channels-last map, walked by index arithmetic.

Array layout (all C-contiguous float32; `wsi_vssm.ops.ss2d_fused` prepares them):
    u:        (batch, L, D)          the inner map, channels last: pixel q = h * W + w, L = H * W
    xdbl:     (batch, L, nd, R + 2N) x_proj of u for the nd directions in `dirs` (dt_low, B, C per pixel)
    dirs:     (nd,) int64            which directions (0..3, see below) the call walks, in that order
    wdt:      (4, R, D)              dt_projs_weight transposed (channels last)
    bias:     (4, D)                 dt_projs_bias
    A:        (4, N, D)              -exp(A_logs), transposed
    Ds:       (4, D)                 the D skip
    out:      (batch, L, D)          the merged output: written by the first direction when `first`, else added
Directions (as `wsi_vssm.ops.cross_scan`): k = 0 row-major, 1 column-major, 2 and 3 their reverses. Direction
k at position p visits pixel `_positions(k, ...)`; the kernel fills those indices per chunk of T positions
(integer arithmetic only) and reads u, xdbl and writes out at them: no gathered copies of the map.

Per direction and position the work is, for the D channels of a block (vectorised over channels, which are
contiguous in memory): dt = bias + W_dt x (R multiply-adds), delta = softplus(dt), h = exp(delta A) h +
delta u B, y = C h + D u, out += y. Flat offsets into u, out, d out and d u are uint64, and the channel loops
count in uint64: numba wraps negative signed indices, and that check on `offset + c` kept LLVM from vectorising
the loops (the kernel pair ran 1.2-2x slower; docs/scan.md). Tasks are (batch, block of channels): every task
owns its output channels, so the accumulation of the four directions into `out` needs no atomics. The lines
of u, out and x_dbl that the step AHEAD positions on will touch are prefetched: in the column directions
consecutive steps are a whole row of the map apart, a new page each time, which the hardware prefetchers do not
follow (docs/scan.md, "Prefetch, huge pages, ...").

Backward: the forward saves the state at the start of every chunk of T positions (batch x nd x ceil(L/T) x N x
D values, 1/T of the map per state); the backward recomputes a chunk from its checkpoint into task-local
buffers (prefetching as the forward does, and the chunk's lines of d out and d u for the reverse walk) and
walks it in reverse. Per-channel sums over L (dA, dDs, d bias, d W_dt) accumulate per chunk in
float32 and across chunks in float64. Sums over channels (d xdbl: the gradients of dt_low, B and C) are per
block: each block writes its own slice of a (blocks, batch, L, nd, R + 2N) buffer that the caller sums.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from wsi_vssm_kernels import use_writable_numba_cache
from wsi_vssm_kernels.scan_cpu import _exp, _prefetch, _softplus, _softplus_of

use_writable_numba_cache(__file__)  # before the first njit(cache=True) below

T_CHUNK = 64  # positions per chunk: the backward's checkpoint interval
AHEAD = 8  # positions between a prefetch and the use of its lines (a few memory latencies of work)
LINE = 16  # float32 values per 64-byte cache line
FM = {"contract"}
FM_SUM = {"contract", "reassoc"}  # the backward's channel sums: reassociation lets LLVM vectorise them


@njit(inline="always", error_model="numpy")
def _positions(k, height, width, t0, n, idx):
    """idx[i] = row-major pixel visited by direction k at position t0 + i, for i < n (no division per step)."""
    length = height * width
    if k == 0:
        for i in range(n):
            idx[i] = t0 + i
    elif k == 2:
        for i in range(n):
            idx[i] = length - 1 - t0 - i
    elif k == 1:  # position p = w * H + h
        hh, ww = t0 % height, t0 // height
        for i in range(n):
            idx[i] = hh * width + ww
            hh += 1
            if hh == height:
                hh, ww = 0, ww + 1
    else:  # k == 3: the column-major order read from its end
        p = length - 1 - t0
        hh, ww = p % height, p // height
        for i in range(n):
            idx[i] = hh * width + ww
            hh -= 1
            if hh < 0:
                hh, ww = height - 1, ww - 1


@njit(inline="always", fastmath=FM, error_model="numpy")
def _dt_row(xf, xb, wk, bk, w, dtb):
    """dtb[:w] = bk + sum_r xf[xb + r] wk[r]: the dt projection of one position for a block of channels.
    (2-D indexing, no row views: a view costs a reference-count update, which is most of a step's overhead.)"""
    for c in range(np.uint64(w)):
        dtb[c] = bk[c]
    for r in range(wk.shape[0]):
        xr = xf[xb + r]
        for c in range(np.uint64(w)):
            dtb[c] += xr * wk[r, c]


@njit(inline="always", fastmath=FM, error_model="numpy")
def _fwd_step(uf, ub, xf, xb, rank, ak, dk, h, dtb, yb, w):
    """One position of one direction for a block: the state updated in place, the output in yb[:w]. Loops
    over channels, each vectorised (no branches inside them)."""
    f = dtb.dtype.type
    nstate = h.shape[0]
    if nstate == 1:
        bn, cn = xf[xb + rank], xf[xb + rank + 1]
        for c in range(np.uint64(w)):
            dl = _softplus(dtb[c], f)
            uv = uf[ub + c]
            hv = _exp(dl * ak[0, c], f) * h[0, c] + dl * uv * bn
            h[0, c] = hv
            yb[c] = dk[c] * uv + cn * hv
        return
    for c in range(np.uint64(w)):
        dtb[c] = _softplus(dtb[c], f)
        yb[c] = dk[c] * uf[ub + c]
    for m in range(nstate):
        bn, cn = xf[xb + rank + m], xf[xb + rank + nstate + m]
        for c in range(np.uint64(w)):
            dl = dtb[c]
            hv = _exp(dl * ak[m, c], f) * h[m, c] + dl * uf[ub + c] * bn
            h[m, c] = hv
            yb[c] += cn * hv


@njit(inline="always", error_model="numpy")
def _store(of, ob, yb, w, write):
    """of[ob:ob + w] = yb (write) or += yb: the branch outside the loops, so both vectorise."""
    if write:
        for c in range(np.uint64(w)):
            of[ob + c] = yb[c]
    else:
        for c in range(np.uint64(w)):
            of[ob + c] += yb[c]


@njit(inline="always", error_model="numpy")
def _prefetch_position(uf, xf, of, q, dim, d0, w, nd, j, c2):
    """Prefetch what the step at pixel q reads: the block's lines of u and of the output, and its x_dbl."""
    for c in range(0, w, LINE):
        _prefetch(uf, q * dim + d0 + c)
        _prefetch(of, q * dim + d0 + c)
    _prefetch(xf, (q * nd + j) * c2)


@njit(parallel=True, cache=True, fastmath=FM, error_model="numpy")
def ss2d_fwd(u, xdbl, dirs, height, width, wdt, bias, A, Ds, first, save_ckpt, cb, out, ckpt):
    """Writes out (batch, L, D); ckpt (batch, nd, ceil(L / T), N, D) when save_ckpt (else a dummy)."""
    batch, length, dim = u.shape
    nd, c2 = xdbl.shape[2], xdbl.shape[3]
    rank, nstate = wdt.shape[1], A.shape[1]
    nblk = (dim + cb - 1) // cb
    uf, xf, of = u.reshape(-1), xdbl.reshape(-1), out.reshape(-1)
    for task in prange(batch * nblk):
        b = task // nblk
        d0 = (task % nblk) * cb
        w = min(cb, dim - d0)
        h = np.empty((nstate, w), u.dtype)
        dtb, yb = np.empty(w, u.dtype), np.empty(w, u.dtype)
        idx = np.empty(T_CHUNK + AHEAD, np.int64)
        for j in range(nd):
            k = dirs[j]
            wk, bk = wdt[k, :, d0:d0 + w].copy(), bias[k, d0:d0 + w].copy()
            ak, dk = A[k, :, d0:d0 + w].copy(), Ds[k, d0:d0 + w].copy()
            h[:] = 0.0
            write = first and j == 0
            for t0 in range(0, length, T_CHUNK):
                n = min(T_CHUNK, length - t0)
                if save_ckpt:
                    ckpt[b, j, t0 // T_CHUNK, :, d0:d0 + w] = h
                ahead = min(T_CHUNK + AHEAD, length - t0)  # positions of this chunk and the next AHEAD
                _positions(k, height, width, t0, ahead, idx)
                for i in range(n):
                    if i + AHEAD < ahead:
                        _prefetch_position(uf, xf, of, b * length + idx[i + AHEAD], dim, d0, w, nd, j, c2)
                    q = b * length + idx[i]
                    xb = (q * nd + j) * c2
                    _dt_row(xf, xb, wk, bk, w, dtb)
                    _fwd_step(uf, np.uint64(q * dim + d0), xf, xb, rank, ak, dk, h, dtb, yb, w)
                    _store(of, np.uint64(q * dim + d0), yb, w, write)


@njit(inline="always", fastmath=FM, error_model="numpy")
def _recompute(uf, xf, gf, duf, idx, b, length, dim, nd, j, c2, d0, w, n, wk, bk, ak, hb, dlb, sgb, ab, dtb):
    """Forward over one chunk from hb[0] (the checkpoint): dlb[i] = delta, sgb[i] = sigmoid(dt), ab[i] =
    exp(delta A), hb[i + 1] = state after position i. Prefetches the lines of u and x_dbl AHEAD positions on,
    and the lines of d out and d u that the reverse walk of this chunk will touch."""
    f = dlb.dtype.type
    rank, nstate = wk.shape[0], ak.shape[0]
    for i in range(n):
        if i + AHEAD < n:
            qa = b * length + idx[i + AHEAD]
            for c in range(0, w, LINE):
                _prefetch(uf, qa * dim + d0 + c)
            _prefetch(xf, (qa * nd + j) * c2)
        q = b * length + idx[i]
        for c in range(0, w, LINE):
            _prefetch(gf, q * dim + d0 + c)
            _prefetch(duf, q * dim + d0 + c)
        xb = (q * nd + j) * c2
        ub = np.uint64(q * dim + d0)
        _dt_row(xf, xb, wk, bk, w, dtb)
        for c in range(np.uint64(w)):  # softplus and sigmoid from one exp(-|dt|)
            dt = dtb[c]
            e = _exp(-abs(dt), f)
            dlb[i, c] = _softplus_of(dt, e, f)
            sgb[i, c] = (f(1.0) if dt > f(0.0) else e) / (f(1.0) + e)
        for m in range(nstate):
            bn = xf[xb + rank + m]
            for c in range(np.uint64(w)):
                dl = dlb[i, c]
                a = _exp(dl * ak[m, c], f)
                ab[i, m, c] = a
                hb[i + 1, m, c] = a * hb[i, m, c] + dl * uf[ub + c] * bn


@njit(inline="always", fastmath=FM_SUM, error_model="numpy")
def _reverse_step(uf, xf, gf, duf, ub, xb, i, rank, wk, ak, dk, hb, dlb, sgb, ab, carry, ddl, dub, acc,
                  dxf, w, write):
    """Position i of a chunk backwards. acc rows: 0 dDs, 1 d bias, 2 .. 2+N dA, then R rows of d W_dt
    (float32, per chunk); dxf[xb:xb + R + 2N] gets this position's sums over the block's channels."""
    nstate = ak.shape[0]
    if nstate == 1:
        _reverse_step1(uf, xf, gf, ub, xb, i, rank, ak, dk, hb, dlb, sgb, ab, carry, ddl, dub, acc, dxf, w)
    else:
        _reverse_step_n(uf, xf, gf, ub, xb, i, rank, ak, dk, hb, dlb, sgb, ab, carry, ddl, dub, acc, dxf, w)
    _store(duf, ub, dub, w, write)
    for r in range(rank):
        xr = xf[xb + r]
        s = 0.0
        for c in range(np.uint64(w)):
            acc[2 + nstate + r, c] += ddl[c] * xr
            s += ddl[c] * wk[r, c]
        dxf[xb + r] = s


@njit(inline="always", fastmath=FM_SUM, error_model="numpy")
def _reverse_step1(uf, xf, gf, ub, xb, i, rank, ak, dk, hb, dlb, sgb, ab, carry, ddl, dub, acc, dxf, w):
    """`_reverse_step` for N = 1 (every VMamba v2 config) in one pass over the channels."""
    bn, cn = xf[xb + rank], xf[xb + rank + 1]
    sb = 0.0
    sc = 0.0
    for c in range(np.uint64(w)):
        dy = gf[ub + c]
        uv = uf[ub + c]
        dl = dlb[i, c]
        a = ab[i, 0, c]
        sc += dy * hb[i + 1, 0, c]
        gh = carry[0, c] + dy * cn
        t = gh * hb[i, 0, c] * a  # d loss / d (delta A)
        ddt = (t * ak[0, c] + gh * uv * bn) * sgb[i, c]
        acc[0, c] += dy * uv
        acc[1, c] += ddt
        acc[2, c] += t * dl
        ddl[c] = ddt
        dub[c] = dy * dk[c] + gh * dl * bn
        sb += gh * dl * uv
        carry[0, c] = gh * a
    dxf[xb + rank] = sb
    dxf[xb + rank + 1] = sc


@njit(inline="always", fastmath=FM_SUM, error_model="numpy")
def _reverse_step_n(uf, xf, gf, ub, xb, i, rank, ak, dk, hb, dlb, sgb, ab, carry, ddl, dub, acc, dxf, w):
    """`_reverse_step`'s state part for any N: ddl[:w] = d loss / d dt, dub[:w] = the scan's d u."""
    nstate = ak.shape[0]
    for c in range(np.uint64(w)):
        dy = gf[ub + c]
        acc[0, c] += dy * uf[ub + c]
        dub[c] = dy * dk[c]
        ddl[c] = 0.0
    for m in range(nstate):
        bn, cn = xf[xb + rank + m], xf[xb + rank + nstate + m]
        sb = 0.0
        sc = 0.0
        for c in range(np.uint64(w)):
            dy = gf[ub + c]
            uv = uf[ub + c]
            dl = dlb[i, c]
            a = ab[i, m, c]
            sc += dy * hb[i + 1, m, c]
            gh = carry[m, c] + dy * cn
            t = gh * hb[i, m, c] * a  # d loss / d (delta A)
            ddl[c] += t * ak[m, c] + gh * uv * bn
            acc[2 + m, c] += t * dl
            dub[c] += gh * dl * bn
            sb += gh * dl * uv
            carry[m, c] = gh * a
        dxf[xb + rank + m] = sb
        dxf[xb + rank + nstate + m] = sc
    for c in range(np.uint64(w)):
        ddt = ddl[c] * sgb[i, c]
        ddl[c] = ddt
        acc[1, c] += ddt


@njit(parallel=True, cache=True, fastmath=FM_SUM, error_model="numpy")
def ss2d_bwd(u, xdbl, dirs, height, width, wdt, bias, A, Ds, ckpt, gout, cb, du, dxdbl, dparams):
    """du (batch, L, D): the scan's part of d u, written; dxdbl (blocks, batch, L, nd, R + 2N) per-block sums,
    written; dparams (batch, nd, 2 + N + R, D) float64 per-sample sums over L: rows dDs, d bias, dA (N), dW_dt
    (R)."""
    batch, length, dim = u.shape
    nd, c2 = xdbl.shape[2], xdbl.shape[3]
    rank, nstate = wdt.shape[1], A.shape[1]
    nblk = (dim + cb - 1) // cb
    nchunks = ckpt.shape[2]
    uf, xf, gf, duf = u.reshape(-1), xdbl.reshape(-1), gout.reshape(-1), du.reshape(-1)
    for task in prange(batch * nblk):
        b = task // nblk
        blk = task % nblk
        d0 = blk * cb
        w = min(cb, dim - d0)
        hb = np.empty((T_CHUNK + 1, nstate, w), u.dtype)
        ab = np.empty((T_CHUNK, nstate, w), u.dtype)
        dlb, sgb = np.empty((T_CHUNK, w), u.dtype), np.empty((T_CHUNK, w), u.dtype)
        carry = np.empty((nstate, w), u.dtype)
        ddl, dub = np.empty(w, u.dtype), np.empty(w, u.dtype)
        acc = np.empty((2 + nstate + rank, w), u.dtype)
        acc64 = np.empty((2 + nstate + rank, w), np.float64)
        idx = np.empty(T_CHUNK, np.int64)
        dxf = dxdbl[blk].reshape(-1)
        for j in range(nd):
            k = dirs[j]
            wk, bk = wdt[k, :, d0:d0 + w].copy(), bias[k, d0:d0 + w].copy()
            ak, dk = A[k, :, d0:d0 + w].copy(), Ds[k, d0:d0 + w].copy()
            carry[:] = 0.0
            acc64[:] = 0.0
            for ci in range(nchunks - 1, -1, -1):
                t0 = ci * T_CHUNK
                n = min(T_CHUNK, length - t0)
                _positions(k, height, width, t0, n, idx)
                hb[0] = ckpt[b, j, ci, :, d0:d0 + w]
                _recompute(uf, xf, gf, duf, idx, b, length, dim, nd, j, c2, d0, w, n, wk, bk, ak, hb, dlb, sgb, ab,
                           ddl)
                acc[:] = 0.0
                for i in range(n - 1, -1, -1):
                    q = b * length + idx[i]
                    xb = (q * nd + j) * c2
                    _reverse_step(uf, xf, gf, duf, np.uint64(q * dim + d0), xb, i, rank, wk, ak, dk, hb, dlb, sgb, ab,
                                  carry, ddl, dub, acc, dxf, w, j == 0)
                acc64 += acc
            dparams[b, j, :, d0:d0 + w] = acc64
