"""Triton selective scan, forward: one program per (batch, block of channels) walks L with the block's N
states in registers. Imported only when asked for (importing wsi_vssm never imports triton).

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests). The kernel is built on first use
rather than at import because triton decides between compiling and interpreting when `triton.jit` runs.
Inputs as in `kernels.scan_cpu`: fp32, C-contiguous; B, C as (batch, G, N, L).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_KERNELS: dict[bool, object] = {}


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


def _kernel():
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interpret not in _KERNELS:
        _KERNELS[interpret] = triton.jit(_scan_fwd_kernel)
    return _KERNELS[interpret]


def scan_fwd(u, delta, A, B, C, Dskip, z, bias, h0, softplus: bool, block_d: int = 32):
    """y (batch, D, L) and the last state (batch, D, N), fp32; z may be None."""
    batch, dim, length = u.shape
    groups, nstate = B.shape[1], A.shape[1]
    y = torch.empty_like(u)
    hlast = torch.empty_like(h0)
    block_n = max(1, triton.next_power_of_2(nstate))
    grid = (batch, triton.cdiv(dim, block_d))
    _kernel()[grid](
        u, delta, A, B, C, Dskip, u if z is None else z, bias, h0, y, hlast, dim, length, groups,
        dim // groups, nstate, HAS_Z=z is not None, SOFTPLUS=softplus, BLOCK_D=block_d, BLOCK_N=block_n,
    )
    return y, hlast
