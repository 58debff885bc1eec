"""Fused CPU selective scan (numba): one pass over memory forward, a checkpointed adjoint pass backward.

Array layout (all C-contiguous, one float dtype; `wsi_vssm.ops.scan` prepares them):
    u, delta:      (batch, D, L)        z: (batch, D, L) or a (1, 1, 1) dummy when has_z is False
    A:             (D, N)               B, C: (batch, G, N, L)   (ungrouped B/C arrive as G = 1)
    Dskip, bias:   (D,)                 (zeros when the caller has none)
    h0:            (batch, D, N)
Channel d reads group d // (D // G). Each (batch, channel) pair is an independent recurrence; the forward runs
`prange` over (batch, blocks of WIDTH channels of one group) and walks L once in chunks of K steps, reading u,
delta, B, C and writing y (the minimum memory traffic). Per chunk: the state-independent work (softplus,
exp(dt A), dt u B) in loops over time that LLVM vectorises, the recurrence as WIDTH interleaved multiply-add
chains (N = 1), then the output C h + D u and the gate, again vectorised; buffers are L1-sized.

Vectorisation needs: no libm calls in the loops (`_exp` builds 2**k by a bit cast, `_pow2`), error_model="numpy"
(Python's ZeroDivisionError check on every float division otherwise makes LLVM keep loops scalar), the helpers
inlined at numba IR level (a call per channel and chunk costs ~100 ns of argument marshalling and refcounting),
and 1-D slices indexed by the loop counter (contiguous loads, not gathers). fastmath is `contract` only (FMA).

Backward memory: the forward saves the state every K steps (batch x D x ceil(L/K) x N values, 1/K of u per
state); the backward recomputes each K-step chunk from its checkpoint into an N x (K+1) local buffer and walks it
in reverse: only the adjoint chain is serial, the rest are vectorised loops over the chunk. Nothing of size
batch x D x N x L is ever allocated. dB and dC are sums over the channels of a group; to avoid write races the
backward parallelises over (batch, group, channel block) and each block owns a slice of a (batch, G, blocks, N, L)
partial buffer that the caller sums (blocks is 1 when batch x G already covers the threads). Sums over L (dA, dD,
d delta_bias) accumulate in float64.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from wsi_vssm_kernels import use_writable_numba_cache

use_writable_numba_cache(__file__)  # before the first njit(cache=True) below

CHUNK = 128  # steps per chunk: vector work unit and, backward, the checkpoint interval
WIDTH = 8  # channels per forward task: WIDTH independent multiply-add chains interleaved (N = 1)
FM = {"contract"}  # fused multiply-add only: no reassociation, inf/nan semantics kept


@intrinsic
def _pow2(typingctx, kf):
    """2 ** kf for an integral float kf in the normal exponent range, built from exponent bits (a bit cast,
    which LLVM vectorises; a table gather or libm's ldexp would not)."""
    if kf not in (types.float32, types.float64):
        return None
    bits, bias, mant = (32, 127, 23) if kf == types.float32 else (64, 1023, 52)

    def codegen(context, builder, signature, args):
        ity = ir.IntType(bits)
        e = builder.add(builder.fptosi(args[0], ity), ir.Constant(ity, bias))
        return builder.bitcast(builder.shl(e, ir.Constant(ity, mant)), context.get_value_type(kf))

    return kf(kf), codegen


@intrinsic
def _prefetch(typingctx, arr, i):
    """A hint to load the cache line holding arr[i] (1-D array) ahead of its use: LLVM's prefetch, read,
    high locality. The hardware prefetchers do not follow the strided, page-crossing walks of the column scan
    directions, whose loads otherwise stall on memory latency step after step."""
    if not isinstance(arr, types.Array) or arr.ndim != 1 or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty)
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, i), codegen


@njit(inline="always", error_model="numpy")
def _exp(x, f):
    """exp(x) as plain arithmetic that LLVM vectorises (libm's exp is a scalar call and numba has no vector
    math without SVML). f: the float type. Inputs are clamped to [-87, 88]: results under exp(-87) ~ 1.6e-38
    only ever scale a state or a sigmoid, far below fp32 resolution. Range reduction by k ln2 (two-part
    constant), then a degree-6 polynomial on |r| <= ln2 / 2: the Chebyshev interpolant of exp there (relative
    error 2.5e-9, under fp32 rounding; 8.9e-8 measured in fp32 against float64 exp, as the degree-7 Taylor
    series it replaced, which took one more multiply-add)."""
    lo, hi = f(-87.0), f(88.0)
    x = lo if x < lo else (hi if x > hi else x)
    k = np.floor(x * f(1.4426950408889634) + f(0.5))
    r = (x - k * f(0.693145751953125)) - k * f(1.4286068203094173e-06)
    p = f(1.0) + r * (f(1.0000000377162153) + r * (f(0.5000000047117972) + r * (f(0.16666415514649002) + r * (
        f(0.041666352896198126) + r * (f(0.008375126398416404) + r * f(0.001394110846934711))))))
    return p * _pow2(k)


@njit(inline="always", error_model="numpy")
def _softplus(x, f):
    """max(x, 0) + log1p(exp(-|x|)), log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3: 2 s g(s^2), g the degree-4
    Chebyshev interpolant of atanh(s) / s on s^2 in [0, 1/9] (relative error 4.1e-9; exact to fp32 rounding,
    also for tiny e; one division, vectorised). Against the 8-term odd series it replaced: the same fp32 error
    (2.5e-7 measured against float64), and the SS2D kernel's inner loop 18% faster (docs/scan.md)."""
    return _softplus_of(x, _exp(-abs(x), f), f)


@njit(inline="always", error_model="numpy")
def _softplus_of(x, e, f):
    """softplus(x) given e = exp(-|x|) (the backward shares e with the sigmoid)."""
    s = e / (f(2.0) + e)
    s2 = s * s
    lg = f(2.0) * s * (f(1.0000000038408787) + s2 * (f(0.3333316082070319) + s2 * (f(0.20012297614800334) + s2 * (
        f(0.13982578880238108) + s2 * f(0.1407888914699734)))))
    return (x if x > f(0.0) else f(0.0)) + lg


@njit(inline="always", error_model="numpy")
def _sigmoid(x, f):
    return f(1.0) / (f(1.0) + _exp(-x, f))


@njit(inline="always", fastmath=FM, error_model="numpy")
def _prep(useg, dseg, Arow, B, b, g, t0, bi, softplus, n, dtbuf, abuf, xbuf):
    """Everything of a chunk of n steps that does not depend on the state, in loops over time that LLVM
    vectorises: dtbuf = dt = softplus(delta + bias), abuf[k] = exp(dt A[k]), xbuf[k] = dt u B[k].
    The 1-D slices indexed by the loop counter keep loads contiguous."""
    f = useg.dtype.type
    if softplus:
        for i in range(n):
            dtbuf[i] = _softplus(dseg[i] + bi, f)
    else:
        for i in range(n):
            dtbuf[i] = dseg[i] + bi
    for k in range(Arow.shape[0]):
        a = Arow[k]
        arow, xrow, brow = abuf[k], xbuf[k], B[b, g, k, t0:t0 + n]
        for i in range(n):
            dt = dtbuf[i]
            arow[i] = _exp(dt * a, f)
            xrow[i] = dt * useg[i] * brow[i]


@njit(inline="always", fastmath=FM, error_model="numpy")
def _chain(abuf, hbuf, h, n):
    """One channel's sequential part, in place: hbuf[k, i] = a[k, i] h_k + hbuf[k, i] (the input x = dt u B
    becomes the state after step i)."""
    for k in range(h.shape[0]):
        hs = h[k]
        arow, hrow = abuf[k], hbuf[k]
        for i in range(n):
            hs = arow[i] * hs + hrow[i]
            hrow[i] = hs
        h[k] = hs


@njit(inline="always", fastmath=FM, error_model="numpy")
def _chain8(abuf, hbuf, h, n):
    """`_chain` for N = 1 and WIDTH = 8 channels: eight independent multiply-add chains interleaved per step,
    so the FMA latency of one chain is hidden by the other seven. Per element: two loads, one FMA, one store."""
    h0, h1, h2, h3 = h[0, 0], h[1, 0], h[2, 0], h[3, 0]
    h4, h5, h6, h7 = h[4, 0], h[5, 0], h[6, 0], h[7, 0]
    for i in range(n):
        h0 = abuf[0, 0, i] * h0 + hbuf[0, 0, i]
        h1 = abuf[1, 0, i] * h1 + hbuf[1, 0, i]
        h2 = abuf[2, 0, i] * h2 + hbuf[2, 0, i]
        h3 = abuf[3, 0, i] * h3 + hbuf[3, 0, i]
        h4 = abuf[4, 0, i] * h4 + hbuf[4, 0, i]
        h5 = abuf[5, 0, i] * h5 + hbuf[5, 0, i]
        h6 = abuf[6, 0, i] * h6 + hbuf[6, 0, i]
        h7 = abuf[7, 0, i] * h7 + hbuf[7, 0, i]
        hbuf[0, 0, i] = h0
        hbuf[1, 0, i] = h1
        hbuf[2, 0, i] = h2
        hbuf[3, 0, i] = h3
        hbuf[4, 0, i] = h4
        hbuf[5, 0, i] = h5
        hbuf[6, 0, i] = h6
        hbuf[7, 0, i] = h7
    h[0, 0], h[1, 0], h[2, 0], h[3, 0] = h0, h1, h2, h3
    h[4, 0], h[5, 0], h[6, 0], h[7, 0] = h4, h5, h6, h7


@njit(inline="always", fastmath=FM, error_model="numpy")
def _output(useg, hbuf, C, b, g, t0, dsk, zseg, yseg, has_z, n, ybuf):
    """yseg = (D u + sum_k C[k] h[k]) * silu(z) (no gate without z), vectorised over time."""
    f = useg.dtype.type
    crow = C[b, g, 0, t0:t0 + n]
    hrow = hbuf[0]
    for i in range(n):
        ybuf[i] = dsk * useg[i] + crow[i] * hrow[i]
    for k in range(1, hbuf.shape[0]):
        crow = C[b, g, k, t0:t0 + n]
        hrow = hbuf[k]
        for i in range(n):
            ybuf[i] += crow[i] * hrow[i]
    if has_z:
        for i in range(n):
            zt = zseg[i]
            yseg[i] = ybuf[i] * zt * _sigmoid(zt, f)
    else:
        for i in range(n):
            yseg[i] = ybuf[i]


@njit(parallel=True, cache=True, fastmath=FM, error_model="numpy")
def scan_fwd(u, delta, A, B, C, Dskip, z, bias, h0, softplus, has_z, save_ckpt, K, y, hlast, ckpt):
    """y (batch, D, L) and hlast (batch, D, N) are written; ckpt (batch, D, ceil(L/K), N) when save_ckpt.

    Tasks are (batch, block of WIDTH channels of one group). Per chunk of K steps: the transcendental work in
    vectorised loops over time per channel (`_prep`), then the recurrence of the block's channels interleaved
    (`_chain8`; `_chain` per channel when N > 1 or the block is short), then the gate; all on L1-resident
    buffers.
    """
    batch, dim, length = u.shape
    groups = B.shape[1]
    nstate = A.shape[1]
    per_group = dim // groups
    nblk = (per_group + WIDTH - 1) // WIDTH
    for task in prange(batch * groups * nblk):
        b = task // (groups * nblk)
        g = (task // nblk) % groups
        d0 = g * per_group + (task % nblk) * WIDTH
        w = min(WIDTH, (g + 1) * per_group - d0)
        h = h0[b, d0:d0 + w].copy()
        dtbuf = np.empty(K, u.dtype)
        ybuf = np.empty(K, u.dtype)
        abuf = np.empty((w, nstate, K), u.dtype)
        hbuf = np.empty((w, nstate, K), u.dtype)
        for t0 in range(0, length, K):
            n = min(K, length - t0)
            t1 = t0 + n
            if save_ckpt:
                ckpt[b, d0:d0 + w, t0 // K, :] = h
            for c in range(w):
                d = d0 + c
                _prep(u[b, d, t0:t1], delta[b, d, t0:t1], A[d], B, b, g, t0, bias[d], softplus, n, dtbuf,
                      abuf[c], hbuf[c])
            if nstate == 1 and w == WIDTH:
                _chain8(abuf, hbuf, h, n)
            else:
                for c in range(w):
                    _chain(abuf[c], hbuf[c], h[c], n)
            for c in range(w):
                d = d0 + c
                zseg = z[b, d, t0:t1] if has_z else z[0, 0, :]
                _output(u[b, d, t0:t1], hbuf[c], C, b, g, t0, Dskip[d], zseg, y[b, d, t0:t1], has_z, n, ybuf)
        hlast[b, d0:d0 + w, :] = h


@njit(inline="always", fastmath=FM, error_model="numpy")
def _recompute_chunk(u, delta, A, B, bias, softplus, b, d, g, t0, n, h_start, hbuf, abuf, xbuf, dtbuf):
    """Fill hbuf[k, 0] = state before t0, hbuf[k, i + 1] = state after step t0 + i, abuf, dtbuf as the
    forward."""
    t1 = t0 + n
    _prep(u[b, d, t0:t1], delta[b, d, t0:t1], A[d], B, b, g, t0, bias[d], softplus, n, dtbuf, abuf, xbuf)
    for k in range(A.shape[1]):
        hs = h_start[k]
        hbuf[k, 0] = hs
        arow, xrow, hrow = abuf[k], xbuf[k], hbuf[k]
        for i in range(n):
            hs = arow[i] * hs + xrow[i]
            hrow[i + 1] = hs


@njit(cache=True, fastmath={"contract", "reassoc"}, error_model="numpy")
def _chunk_sum(x, n):
    """sum(x[:n]) in float64; reassociation lets LLVM vectorise it (lane-wise partial sums)."""
    s = 0.0
    for i in range(n):
        s += np.float64(x[i])
    return s


@njit(inline="always", fastmath=FM, error_model="numpy")
def _reverse_chunk(u, A, B, C, Dskip, z, dout, softplus, has_z, b, d, g, blk, t0, n, hbuf, abuf, dtbuf, sgz,
                   sgd, gbuf, dyv, tmp, carry, acc64, du, ddelta, dz, dB, dC):
    """Steps t0+n-1 .. t0 backwards; carry holds d loss / d h flowing in from after the chunk. The only serial
    part is the adjoint chain carry <- a carry + a dy C (per state; g = carry + dy C); everything else is a
    vectorised loop over time. sgz = sigmoid(z), sgd = sigmoid(delta + bias) over the chunk (when used).
    acc64[:N] accumulates dA[d, :], acc64[N] dD[d], acc64[N + 1] d delta_bias[d] (float64: sums over L)."""
    nstate = A.shape[1]
    f = u.dtype.type
    one = f(1.0)
    t1 = t0 + n
    useg, dyseg, duseg, ddseg = u[b, d, t0:t1], dout[b, d, t0:t1], du[b, d, t0:t1], ddelta[b, d, t0:t1]
    dsk = Dskip[d]
    if has_z:
        zseg, dzseg = z[b, d, t0:t1], dz[b, d, t0:t1]
        for i in range(n):
            tmp[i] = dsk * useg[i]
        for k in range(nstate):
            crow, hrow = C[b, g, k, t0:t1], hbuf[k]
            for i in range(n):
                tmp[i] += crow[i] * hrow[i + 1]
        for i in range(n):
            zt, s, dy = zseg[i], sgz[i], dyseg[i]
            dzseg[i] = dy * tmp[i] * s * (one + zt * (one - s))
            dyv[i] = dy * zt * s
    else:
        for i in range(n):
            dyv[i] = dyseg[i]
    for i in range(n):
        tmp[i] = dyv[i] * useg[i]
        duseg[i] = dyv[i] * dsk
        ddseg[i] = f(0.0)
    acc64[nstate] += _chunk_sum(tmp, n)
    for k in range(nstate):
        arow, hrow = abuf[k], hbuf[k]
        brow, crow = B[b, g, k, t0:t1], C[b, g, k, t0:t1]
        dBrow, dCrow = dB[b, g, blk, k, t0:t1], dC[b, g, blk, k, t0:t1]
        for i in range(n):
            tmp[i] = dyv[i] * crow[i] * arow[i]
        cr = carry[k]
        for i in range(n - 1, -1, -1):  # carry into step i, then out of it: one FMA of latency per step
            gbuf[i] = cr
            cr = arow[i] * cr + tmp[i]
        carry[k] = cr
        ak = A[d, k]
        for i in range(n):
            gh = gbuf[i] + dyv[i] * crow[i]
            dt, ut, bt = dtbuf[i], useg[i], brow[i]
            dCrow[i] += dyv[i] * hrow[i + 1]
            ha = gh * hrow[i] * arow[i]  # d loss / d (dt * A[d, k])
            ddseg[i] += ha * ak + gh * bt * ut
            tmp[i] = ha * dt
            duseg[i] += gh * bt * dt
            dBrow[i] += gh * dt * ut
        acc64[k] += _chunk_sum(tmp, n)
    if softplus:
        for i in range(n):
            ddseg[i] = ddseg[i] * sgd[i]
    acc64[nstate + 1] += _chunk_sum(ddseg, n)


@njit(inline="always", fastmath=FM, error_model="numpy")
def _chunk_sigmoids(delta, z, bias, softplus, has_z, b, d, t0, n, sgz, sgd):
    """sgz = sigmoid(z), sgd = sigmoid(delta + bias) (softplus' derivative) over the chunk, when used."""
    f = delta.dtype.type
    if has_z:
        zseg = z[b, d, t0:t0 + n]
        for i in range(n):
            sgz[i] = _sigmoid(zseg[i], f)
    if softplus:
        dseg = delta[b, d, t0:t0 + n]
        bi = bias[d]
        for i in range(n):
            sgd[i] = _sigmoid(dseg[i] + bi, f)


@njit(parallel=True, cache=True, fastmath=FM, error_model="numpy")
def scan_bwd(u, delta, A, B, C, Dskip, z, bias, dout, dlast, ckpt, softplus, has_z, K, blocks,
             du, ddelta, dz, dB, dC, dA, dD, dbias, dh0):
    """Gradients. dB, dC: (batch, G, blocks, N, L) partials, zeroed by the caller; dA: (batch, D, N) and
    dD, dbias: (batch, D) per-batch float64 partials; du, ddelta, dz: (batch, D, L); dh0: (batch, D, N)."""
    batch, dim, length = u.shape
    groups = B.shape[1]
    nstate = A.shape[1]
    per_group = dim // groups
    per_block = (per_group + blocks - 1) // blocks
    nchunks = ckpt.shape[2]
    for task in prange(batch * groups * blocks):
        b = task // (groups * blocks)
        g = (task // blocks) % groups
        blk = task % blocks
        hbuf = np.empty((nstate, K + 1), u.dtype)
        abuf = np.empty((nstate, K), u.dtype)
        xbuf = np.empty((nstate, K), u.dtype)
        bufs = np.empty((6, K), u.dtype)  # dt, sigmoid(z), sigmoid(delta + bias), adjoint, gated dy, scratch
        acc64 = np.empty(nstate + 2, np.float64)
        d_lo = g * per_group + blk * per_block
        for d in range(d_lo, min(d_lo + per_block, (g + 1) * per_group)):
            carry = dlast[b, d].copy()
            acc64[:] = 0.0
            for c in range(nchunks - 1, -1, -1):
                t0 = c * K
                n = min(K, length - t0)
                _recompute_chunk(u, delta, A, B, bias, softplus, b, d, g, t0, n, ckpt[b, d, c], hbuf, abuf, xbuf,
                                 bufs[0])
                _chunk_sigmoids(delta, z, bias, softplus, has_z, b, d, t0, n, bufs[1], bufs[2])
                _reverse_chunk(u, A, B, C, Dskip, z, dout, softplus, has_z, b, d, g, blk, t0, n, hbuf, abuf,
                               bufs[0], bufs[1], bufs[2], bufs[3], bufs[4], bufs[5], carry, acc64, du, ddelta, dz,
                               dB, dC)
            dA[b, d, :] = acc64[:nstate]
            dD[b, d] = acc64[nstate]
            dbias[b, d] = acc64[nstate + 1]
            dh0[b, d, :] = carry


def backward_blocks(batch: int, groups: int, per_group: int, threads: int) -> int:
    """Channel blocks per (batch, group) so that the backward has about two tasks per thread."""
    return max(1, min(per_group, math.ceil(2 * threads / max(1, batch * groups))))
