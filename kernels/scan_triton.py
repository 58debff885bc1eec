"""Triton selective scan, forward and backward. Imported only when asked for (importing wsi_vssm never imports
triton).

Two forward kernels, same arguments and results:
  tiled   (default) one program per (batch, block of channels) walks L in tiles of BLOCK_L steps. Each tile is
          loaded along L (coalesced), its recurrence solved by a parallel prefix scan over the tile
          (`tl.associative_scan` on the pairs (a, b) of h = a*h + b), then offset by the carried state. For
          training it also saves the state entering each tile (1/BLOCK_L of the states).
  serial  the same program walks L one step at a time: the plain recurrence, kept as the kernel's readable twin
          and as the baseline of bench/gpu.py.
One backward kernel (`scan_bwd`): tiles in reverse, each recomputed from its saved state by the same prefix scan,
the adjoint by a reverse scan, every gradient in the same pass (the CPU twin is kernels/scan_cpu.py's scan_bwd).

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests). The kernel is built on first use
rather than at import because triton decides between compiling and interpreting when `triton.jit` runs.
Inputs as in `kernels.scan_cpu`: fp32, C-contiguous; B, C as (batch, G, N, L).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_KERNELS: dict[tuple[str, bool], object] = {}
_combine_jit = None  # the tiled kernel's combine function, jitted by _kernel() for the current mode


def _scan_fwd_kernel(u, delta, A, B, C, Dskip, z, bias, h0, y, hlast, dim, length, groups, per_group, nstate,
                     HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    md = offs_d < dim
    mdn = md[:, None] & (offs_n < nstate)[None, :]
    dn = offs_d[:, None] * nstate + offs_n[None, :]
    a = tl.load(A + dn, mask=mdn, other=0.0)
    h = tl.load(h0 + b * dim * nstate + dn, mask=mdn, other=0.0)
    dsk = tl.load(Dskip + offs_d, mask=md, other=0.0)
    bi = tl.load(bias + offs_d, mask=md, other=0.0)
    # int64 offsets: batch x D x L passes 2**31 for long sequences.
    row = (b * dim + offs_d).to(tl.int64) * length
    grp = (b * groups + offs_d // per_group).to(tl.int64)
    bc_row = (grp[:, None] * nstate + offs_n[None, :]) * length
    for t in range(0, length):
        dt = tl.load(delta + row + t, mask=md, other=0.0) + bi
        if SOFTPLUS:
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
        ut = tl.load(u + row + t, mask=md, other=0.0)
        bt = tl.load(B + bc_row + t, mask=mdn, other=0.0)
        ct = tl.load(C + bc_row + t, mask=mdn, other=0.0)
        h = tl.exp(dt[:, None] * a) * h + (dt * ut)[:, None] * bt
        yt = tl.sum(h * ct, axis=1) + dsk * ut
        if HAS_Z:
            zt = tl.load(z + row + t, mask=md, other=0.0)
            yt = yt * zt / (1.0 + tl.exp(-zt))
        tl.store(y + row + t, yt, mask=md)
    tl.store(hlast + b * dim * nstate + dn, h, mask=mdn)


def _combine(a1, b1, a2, b2):
    # h -> a1*h + b1, then h -> a2*h + b2: composed, h -> (a1*a2)*h + (a2*b1 + b2)
    return a1 * a2, a2 * b1 + b2


def _scan_fwd_tiled_kernel(u, delta, A, B, C, Dskip, z, bias, h0, y, hlast, hck, dim, length, groups, per_group,
                           nstate, ntiles, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE_STATES: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    md = offs_d < dim
    mdn = md[:, None] & (offs_n < nstate)[None, :]
    dn = offs_d[:, None] * nstate + offs_n[None, :]
    a_dn = tl.load(A + dn, mask=mdn, other=0.0)                      # (D, N)
    h = tl.load(h0 + b * dim * nstate + dn, mask=mdn, other=0.0)     # (D, N), carried across tiles
    dsk = tl.load(Dskip + offs_d, mask=md, other=0.0)
    bi = tl.load(bias + offs_d, mask=md, other=0.0)
    row = (b * dim + offs_d).to(tl.int64) * length                   # int64: batch x D x L passes 2**31
    grp = (b * groups + offs_d // per_group).to(tl.int64)
    bc_row = (grp[:, None] * nstate + offs_n[None, :]) * length      # (D, N)
    ck = ((b * dim + offs_d[:, None]).to(tl.int64) * nstate + offs_n[None, :]) * ntiles  # (D, N)
    for t0 in range(0, length, BLOCK_L):
        if SAVE_STATES:  # the state entering each tile: where the backward restarts its recomputation
            tl.store(hck + ck + t0 // BLOCK_L, h, mask=mdn)
        t = t0 + offs_l
        ml = t < length
        mdl = md[:, None] & ml[None, :]                              # (D, L)
        dl = row[:, None] + t[None, :]
        dt = tl.load(delta + dl, mask=mdl, other=0.0) + bi[:, None]
        if SOFTPLUS:
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
        ut = tl.load(u + dl, mask=mdl, other=0.0)
        mdnl = mdn[:, :, None] & ml[None, None, :]                   # (D, N, L)
        bcl = bc_row[:, :, None] + t[None, None, :]
        bt = tl.load(B + bcl, mask=mdnl, other=0.0)
        ct = tl.load(C + bcl, mask=mdnl, other=0.0)
        # steps past the end (and masked channels) are the identity: a = 1, b = 0
        at = tl.where(mdnl, tl.exp(dt[:, None, :] * a_dn[:, :, None]), 1.0)
        xt = tl.where(mdnl, (dt * ut)[:, None, :] * bt, 0.0)
        acum, xcum = tl.associative_scan((at, xt), 2, _combine_jit)
        hs = acum * h[:, :, None] + xcum                              # (D, N, L): the state after each step
        yt = tl.sum(hs * ct, axis=1) + dsk[:, None] * ut
        if HAS_Z:
            zt = tl.load(z + dl, mask=mdl, other=0.0)
            yt = yt * zt / (1.0 + tl.exp(-zt))
        tl.store(y + dl, yt, mask=mdl)
        h = tl.sum(tl.where(offs_l[None, None, :] == BLOCK_L - 1, hs, 0.0), axis=2)  # masked tail: identity
    tl.store(hlast + b * dim * nstate + dn, h, mask=mdn)


def _scan_bwd_tiled_kernel(u, delta, A, B, C, Dskip, z, bias, hck, dout, dlast, du, ddelta, dz, dB, dC, dA_part,
                           dD_part, dbias_part, dh0, dim, length, groups, per_group, nstate, ntiles,
                           HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """One program per (batch, block of channels of one group), tiles from the last to the first. Per tile:
    recompute the states from the saved entering state (a forward prefix scan), then the adjoint g_t = dL/dh_t
    by a reverse scan of g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}, then every gradient from both at once.
    dA h_{t-1} is taken as h_t - dt_t u_t B_t (no division by a decay that may underflow). The carry between
    tiles is the gradient of the state entering the later tile; at the start it is dlast."""
    b = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    md = offs_d < dim
    mn = offs_n < nstate
    mdn = md[:, None] & mn[None, :]
    dn = offs_d[:, None] * nstate + offs_n[None, :]
    a_dn = tl.load(A + dn, mask=mdn, other=0.0)
    dsk = tl.load(Dskip + offs_d, mask=md, other=0.0)
    bi = tl.load(bias + offs_d, mask=md, other=0.0)
    row = (b * dim + offs_d).to(tl.int64) * length
    grp = (b * groups + d0 // per_group).to(tl.int64)                # the block lies in one group (scan_bwd)
    bc_row = (grp * nstate + offs_n).to(tl.int64) * length          # (N,)
    bdn = (b * dim * nstate + dn).to(tl.int64)
    ck = bdn * ntiles
    g = tl.load(dlast + bdn, mask=mdn, other=0.0)                    # dL/d(state entering the later tile)
    acc_a = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(0, ntiles):
        tile = ntiles - 1 - i
        t = tile * BLOCK_L + offs_l
        ml = t < length
        mdl = md[:, None] & ml[None, :]
        mdnl = mdn[:, :, None] & ml[None, None, :]
        dl = row[:, None] + t[None, :]
        nl = bc_row[:, None] + t[None, :]                           # (N, L)
        mnl = mn[:, None] & ml[None, :]
        raw = tl.load(delta + dl, mask=mdl, other=0.0) + bi[:, None]
        dt = raw
        if SOFTPLUS:
            dt = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw)))
        ut = tl.load(u + dl, mask=mdl, other=0.0)
        bt = tl.load(B + nl, mask=mnl, other=0.0)[None, :, :]         # (1, N, L)
        ct = tl.load(C + nl, mask=mnl, other=0.0)[None, :, :]
        decay = tl.where(mdnl, tl.exp(dt[:, None, :] * a_dn[:, :, None]), 1.0)
        xt = tl.where(mdnl, (dt * ut)[:, None, :] * bt, 0.0)
        h_in = tl.load(hck + ck + tile, mask=mdn, other=0.0)
        acum, xcum = tl.associative_scan((decay, xt), 2, _combine_jit)
        hs = acum * h_in[:, :, None] + xcum                          # h_t
        dy = tl.load(dout + dl, mask=mdl, other=0.0)
        if HAS_Z:
            zt = tl.load(z + dl, mask=mdl, other=0.0)
            sig = 1.0 / (1.0 + tl.exp(-zt))
            yt = tl.sum(hs * ct, axis=1) + dsk[:, None] * ut
            tl.store(dz + dl, dy * yt * sig * (1.0 + zt * (1.0 - sig)), mask=mdl)
            dy = dy * zt * sig
        # the decay of the next step inside this tile; across the tile's end the carry already includes it
        t1 = t + 1
        m1 = ml & (offs_l < BLOCK_L - 1) & (t1 < length)
        raw1 = tl.load(delta + row[:, None] + t1[None, :], mask=md[:, None] & m1[None, :], other=0.0) + bi[:, None]
        dt1 = raw1
        if SOFTPLUS:
            dt1 = tl.where(raw1 > 20.0, raw1, tl.log(1.0 + tl.exp(raw1)))
        nxt = tl.where(mdn[:, :, None] & m1[None, None, :], tl.exp(dt1[:, None, :] * a_dn[:, :, None]), 1.0)
        gacc, gx = tl.associative_scan((nxt, tl.where(mdnl, ct * dy[:, None, :], 0.0)), 2, _combine_jit,
                                       reverse=True)
        gs = tl.where(mdnl, gacc * g[:, :, None] + gx, 0.0)          # g_t = dL/dh_t
        prev = hs - xt                                               # exp(dt_t A) h_{t-1}
        ddt = tl.sum(gs * (prev * a_dn[:, :, None] + ut[:, None, :] * bt), axis=1)
        acc_a += tl.sum(gs * prev * dt[:, None, :], axis=2)
        tl.store(du + dl, dsk[:, None] * dy + dt * tl.sum(gs * bt, axis=1), mask=mdl)
        acc_d += tl.sum(dy * ut, axis=1)
        if SOFTPLUS:
            ddt = tl.where(raw > 20.0, ddt, ddt / (1.0 + tl.exp(-raw)))
        ddt = tl.where(mdl, ddt, 0.0)
        tl.store(ddelta + dl, ddt, mask=mdl)
        acc_bias += tl.sum(ddt, axis=1)
        # dB and dC sum over the group's channels; other programs of the group add theirs
        tl.atomic_add(dB + nl, tl.sum(gs * (dt * ut)[:, None, :], axis=0), mask=mnl)
        tl.atomic_add(dC + nl, tl.sum(hs * dy[:, None, :], axis=0), mask=mnl)
        first = tl.sum(tl.where(offs_l[None, None, :] == 0, gs * decay, 0.0), axis=2)
        g = first                                                    # dL/d(state entering this tile)
    tl.store(dh0 + bdn, g, mask=mdn)
    tl.store(dA_part + bdn, acc_a, mask=mdn)
    tl.store(dD_part + b * dim + offs_d, acc_d, mask=md)
    tl.store(dbias_part + b * dim + offs_d, acc_bias, mask=md)


_SOURCES = {"serial": _scan_fwd_kernel, "tiled": _scan_fwd_tiled_kernel, "backward": _scan_bwd_tiled_kernel}
VARIANTS = ("serial", "tiled")  # the forward kernels
DEFAULT_VARIANT = "tiled"  # what selective_scan(impl="triton") runs; bench/gpu.py switches it to compare


def _kernel(variant: str):
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    key = (variant, interpret)
    if key not in _KERNELS:
        # the tiled kernel calls _combine_jit by its global name: bind the build for this mode first
        if ("combine", interpret) not in _KERNELS:
            _KERNELS[("combine", interpret)] = triton.jit(_combine)
        globals()["_combine_jit"] = _KERNELS[("combine", interpret)]
        _KERNELS[key] = triton.jit(_SOURCES[variant])
    return _KERNELS[key]


def _tile(length: int, block_d: int, block_n: int, budget: int) -> int:
    # a tile holds BLOCK_D x BLOCK_N x BLOCK_L states: keep it near `budget` values (registers), and no longer
    # than the sequence (a short L would be mostly masked lanes)
    return max(16, min(512, budget // (block_d * block_n), triton.next_power_of_2(length)))


def grad_tile(length: int, nstate: int) -> int:
    """BLOCK_L of the backward, so of the forward that saves states for it: the backward keeps about eight
    tile-sized tensors live, so its tiles are a quarter of the forward's."""
    return _tile(length, 4, max(1, triton.next_power_of_2(nstate)), 512)


def scan_fwd(u, delta, A, B, C, Dskip, z, bias, h0, softplus: bool, variant: str | None = None,
             block_d: int | None = None, block_l: int | None = None, save_states: bool = False,
             num_warps: int | None = None):
    """y (batch, D, L) and the last state (batch, D, N), fp32; z may be None. With `save_states` (tiled only,
    tiles of `grad_tile` unless `block_l` says), also the state entering every tile, (batch, D, N, tiles): what
    `scan_bwd` needs. block_d, block_l and num_warps override the tuned defaults (bench/gpu.py's scan_tune)."""
    variant = variant or DEFAULT_VARIANT
    if variant not in VARIANTS:
        raise ValueError(f"unknown triton scan variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if save_states and variant != "tiled":
        raise ValueError("save_states needs the tiled kernel")
    batch, dim, length = u.shape
    groups, nstate = B.shape[1], A.shape[1]
    y = torch.empty_like(u)
    hlast = torch.empty_like(h0)
    block_n = max(1, triton.next_power_of_2(nstate))
    args = (u, delta, A, B, C, Dskip, u if z is None else z, bias, h0, y, hlast)
    sizes = (dim, length, groups, dim // groups, nstate)
    flags = dict(HAS_Z=z is not None, SOFTPLUS=softplus, BLOCK_N=block_n)
    if num_warps:
        flags["num_warps"] = num_warps
    if variant == "serial":
        block_d = block_d or 32
        _kernel(variant)[(batch, triton.cdiv(dim, block_d))](*args, *sizes, **flags, BLOCK_D=block_d)
        return y, hlast
    # bench/gpu.py on an H200 (768 channels): 4 channels per program is faster at L = 4k (more work per
    # program), 2 from L = 64k on (more programs in flight): +15-20% there
    block_d = block_d or (2 if length >= 32768 else 4)
    if save_states:
        block_l = block_l or grad_tile(length, nstate)
    block_l = block_l or _tile(length, block_d, block_n, 2048)
    ntiles = triton.cdiv(length, block_l)
    hck = h0.new_empty(batch, dim, nstate, ntiles) if save_states else h0
    _kernel(variant)[(batch, triton.cdiv(dim, block_d))](*args, hck, *sizes, ntiles, **flags,
                                                         SAVE_STATES=save_states, BLOCK_D=block_d,
                                                         BLOCK_L=block_l)
    return (y, hlast, hck) if save_states else (y, hlast)


def scan_bwd(u, delta, A, B, C, Dskip, z, bias, hck, dout, dlast, softplus: bool, block_d: int | None = None,
             block_l: int | None = None, num_warps: int | None = None):
    """Gradients of `scan_fwd(..., save_states=True)` given dL/dy (batch, D, L) and dL/d(last state)
    (batch, D, N), fp32: du, ddelta, dA (D, N), dB, dC (batch, G, N, L), dD, dz (None without z), dbias,
    dh0 (batch, D, N). Nothing of size batch x D x N x L is allocated. `block_l` must be the forward's."""
    batch, dim, length = u.shape
    groups, nstate = B.shape[1], A.shape[1]
    per_group = dim // groups
    ntiles = hck.shape[-1]
    block_l = block_l or grad_tile(length, nstate)
    if triton.cdiv(length, block_l) != ntiles:
        raise ValueError(f"hck was not saved with tiles of {block_l} steps (the forward's block_l)")
    block_n = max(1, triton.next_power_of_2(nstate))
    block_d = block_d or 4
    while per_group % block_d:  # a program's channels share one group: its dB, dC rows are one sum
        block_d //= 2
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dz = torch.empty_like(u) if z is not None else None
    dB, dC = torch.zeros_like(B), torch.zeros_like(C)
    dA = torch.empty(batch, dim, nstate, device=u.device, dtype=torch.float32)
    dD = torch.empty(batch, dim, device=u.device, dtype=torch.float32)
    dbias = torch.empty_like(dD)
    dh0 = torch.empty_like(dA)
    _kernel("backward")[(batch, triton.cdiv(dim, block_d))](
        u, delta, A, B, C, Dskip, u if z is None else z, bias, hck, dout, dlast, du, ddelta,
        du if dz is None else dz, dB, dC, dA, dD, dbias, dh0, dim, length, groups, per_group, nstate, ntiles,
        HAS_Z=z is not None, SOFTPLUS=softplus, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l,
        **({"num_warps": num_warps} if num_warps else {}))
    return du, ddelta, dA.sum(0), dB, dC, dD.sum(0), dz, dbias.sum(0), dh0
