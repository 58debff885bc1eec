"""Triton selective scan, forward. Imported only when asked for (importing wsi_vssm never imports triton).

Two kernels, same arguments and results:
  tiled   (default) one program per (batch, block of channels) walks L in tiles of BLOCK_L steps. Each tile is
          loaded along L (coalesced), its recurrence solved by a parallel prefix scan over the tile
          (`tl.associative_scan` on the pairs (a, b) of h = a*h + b), then offset by the carried state.
  serial  the same program walks L one step at a time: the plain recurrence, kept as the kernel's readable twin
          and as the baseline of bench/gpu.py.

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


def _scan_fwd_tiled_kernel(u, delta, A, B, C, Dskip, z, bias, h0, y, hlast, dim, length, groups, per_group,
                           nstate, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
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
    for t0 in range(0, length, BLOCK_L):
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


_SOURCES = {"serial": _scan_fwd_kernel, "tiled": _scan_fwd_tiled_kernel}
VARIANTS = tuple(_SOURCES)
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


def scan_fwd(u, delta, A, B, C, Dskip, z, bias, h0, softplus: bool, variant: str | None = None,
             block_d: int | None = None, block_l: int | None = None):
    """y (batch, D, L) and the last state (batch, D, N), fp32; z may be None."""
    variant = variant or DEFAULT_VARIANT
    if variant not in _SOURCES:
        raise ValueError(f"unknown triton scan variant {variant!r}; valid: {', '.join(VARIANTS)}")
    batch, dim, length = u.shape
    groups, nstate = B.shape[1], A.shape[1]
    y = torch.empty_like(u)
    hlast = torch.empty_like(h0)
    block_n = max(1, triton.next_power_of_2(nstate))
    args = (u, delta, A, B, C, Dskip, u if z is None else z, bias, h0, y, hlast, dim, length, groups,
            dim // groups, nstate)
    flags = dict(HAS_Z=z is not None, SOFTPLUS=softplus, BLOCK_N=block_n)
    if variant == "serial":
        block_d = block_d or 32
        _kernel(variant)[(batch, triton.cdiv(dim, block_d))](*args, **flags, BLOCK_D=block_d)
    else:
        # bench/gpu.py on an H200 (768 channels): 4 channels per program is faster at L = 4k (more work per
        # program), 2 from L = 64k on (more programs in flight): +15-20% there
        block_d = block_d or (2 if length >= 32768 else 4)
        # a tile holds BLOCK_D x BLOCK_N x BLOCK_L states: keep it near 2k values (registers)
        # (no longer than the sequence: a short L would be mostly masked lanes)
        block_l = block_l or max(16, min(512, 2048 // (block_d * block_n), triton.next_power_of_2(length)))
        _kernel(variant)[(batch, triton.cdiv(dim, block_d))](*args, **flags, BLOCK_D=block_d, BLOCK_L=block_l)
    return y, hlast
