"""The 2D selective scan of SS2D in one call: four directions, projections, scans and merge.

    cross_selective_scan(u, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, impl="auto",
                         low_memory=False) -> y

Shapes (K = 4 directions, D inner channels, R = dt_rank, N = d_state):
    u:                (B, H, W, D)   channels last (a `permute(0, 2, 3, 1)` view of a channels-last map)
    x_proj_weight:    (K, R + 2N, D) dt_projs_weight: (K, D, R)   dt_projs_bias: (K, D)
    A_logs:           (K * D, N)     Ds: (K * D,)
    y:                (B, H, W, D)   the merged output: for every pixel the sum of the four directions' outputs
Per direction k (orders of `wsi_vssm.ops.cross_scan`): x_dbl = x_proj[k] u -> (dt_low, B, C); delta =
softplus(dt_projs[k] dt_low + bias[k]); the selective scan with A = -exp(A_logs), skip Ds, from a zero state.

Implementations (same signature, tested against each other on outputs and every gradient):
    reference  today's path: cross_scan to four copies, einsum projections, `selective_scan(impl=scan)`,
               cross_merge. Any device and dtype; differentiable by autograd. The spec.
    fused      CPU, one numba kernel pair (kernels/ss2d_cpu.py). x_proj stays a torch GEMM over the whole map
               (one (B*L, D) x (D, K(R+2N)) matmul: cheaper there than per position in the kernel); dt_proj,
               softplus, the scan, the D skip and the merge run in the kernel, walking the directions by index
               arithmetic and accumulating the merged output in place. Backward: `_FusedFn`.
    auto       fused for CPU tensors, reference otherwise.
`low_memory` (no autograd only): x_proj and the kernel run one direction at a time, so the extra memory beyond
u and y is one direction's x_dbl (B, L, R + 2N) instead of four.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsi_vssm.ops import scan as _scan
from wsi_vssm.ops.cross_scan import K_DIRECTIONS, cross_merge, cross_scan

SS2D_IMPLS = ("auto", "reference", "fused")
_NO_CKPT = torch.empty(1, 1, 1, 1, 1)


def _fused_kernels():
    return _scan.numba_kernel_module("ss2d_cpu", "the fused CPU SS2D")


WIDE_BLOCK = 384  # widest channel block per task: its per-chunk buffers stay in L2


def block_width(batch: int, dim: int, threads: int) -> int:
    """Channels per kernel task: as wide as possible (a task reads whole pixels, i.e. contiguous memory, instead
    of a thin strided slice of each: the strided walk was memory-latency bound), split only as far as needed to
    give every thread one task (at most WIDE_BLOCK channels, a multiple of 8)."""
    per = max(1, -(-threads // batch))  # channel blocks per sample so that batch x blocks >= threads
    blocks = per
    while -(-dim // blocks) > WIDE_BLOCK:
        blocks += per
    width = -(-dim // blocks)
    return max(8, -(-width // 8) * 8)


def cross_selective_scan_reference(u, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, scan="auto",
                                   low_memory=False):
    """Today's path (cross_scan, einsum, one grouped `selective_scan` with impl `scan`, cross_merge).
    `low_memory` is accepted for the fused kernel's signature and ignored: this path has no low-memory form."""
    b, h, w, d = u.shape
    k, r, n = K_DIRECTIONS, dt_projs_weight.shape[2], A_logs.shape[1]
    xs = cross_scan(u.permute(0, 3, 1, 2))  # (B, K, D, L)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight)  # (B, K, R+2N, L)
    dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight)  # (B, K, D, L)
    ys = _scan.selective_scan(
        xs.reshape(b, k * d, h * w), dts.reshape(b, k * d, h * w), -torch.exp(A_logs.float()),
        bs.contiguous(), cs.contiguous(), Ds.float(), delta_bias=dt_projs_bias.float().reshape(-1),
        delta_softplus=True, impl=scan,
    )  # (B, K*D, L)
    return cross_merge(ys.view(b, k, d, h * w), h, w).permute(0, 2, 3, 1)  # (B, H, W, D)


def _kernel_params(dt_projs_weight, dt_projs_bias, A_logs, Ds):
    """The kernel's channels-last fp32 copies: W_dt (K, R, D), bias (K, D), A (K, N, D), Ds (K, D)."""
    k, d, _ = dt_projs_weight.shape
    f32 = torch.float32
    wdt = dt_projs_weight.detach().to(f32).transpose(1, 2).contiguous()
    a = (-torch.exp(A_logs.detach().to(f32))).view(k, d, -1).transpose(1, 2).contiguous()
    return wdt, dt_projs_bias.detach().to(f32).contiguous(), a, Ds.detach().to(f32).view(k, d).contiguous()


def _run_fwd(kern, u, xdbl, dirs, hw, params, first, ckpt, out):
    with _scan._CPU_LOCK:
        threads = _scan._set_numba_threads()
        cb = block_width(u.shape[0], u.shape[2], threads)
        kern.ss2d_fwd(u.numpy(), xdbl.numpy(), dirs.numpy(), hw[0], hw[1], *(p.numpy() for p in params), first,
                      ckpt is not None, cb, out.numpy(), (ckpt if ckpt is not None else _NO_CKPT).numpy())


class _FusedFn(torch.autograd.Function):
    """u (B, L, D), xdbl (B, L, K, R+2N) fp32 contiguous -> y (B, L, D); gradients of all six inputs."""

    @staticmethod
    def forward(ctx, u, xdbl, dt_projs_weight, dt_projs_bias, A_logs, Ds, hw):
        kern = _fused_kernels()
        params = _kernel_params(dt_projs_weight, dt_projs_bias, A_logs, Ds)
        b, length, d = u.shape
        dirs = torch.arange(K_DIRECTIONS, dtype=torch.int64)
        nstate = A_logs.shape[1]
        ckpt = torch.empty(b, K_DIRECTIONS, -(-length // kern.T_CHUNK), nstate, d)
        y = torch.empty_like(u)
        _run_fwd(kern, u, xdbl, dirs, hw, params, True, ckpt, y)
        ctx.save_for_backward(u, xdbl, ckpt, *params)
        ctx.hw = hw
        return y

    @staticmethod
    def backward(ctx, gy):
        kern = _fused_kernels()
        u, xdbl, ckpt, wdt, bias, a, ds = ctx.saved_tensors
        b, length, d = u.shape
        k, rank, nstate = K_DIRECTIONS, wdt.shape[1], a.shape[1]
        gy = gy.float().contiguous()
        du = torch.empty_like(u)
        dirs = torch.arange(k, dtype=torch.int64)
        with _scan._CPU_LOCK:
            threads = _scan._set_numba_threads()
            cb = block_width(b, d, threads)
            blocks = -(-d // cb)
            dx = torch.empty(blocks, *xdbl.shape)
            dp = torch.empty(b, k, 2 + nstate + rank, d, dtype=torch.float64)
            kern.ss2d_bwd(u.numpy(), xdbl.numpy(), dirs.numpy(), ctx.hw[0], ctx.hw[1], wdt.numpy(), bias.numpy(),
                          a.numpy(), ds.numpy(), ckpt.numpy(), gy.numpy(), cb, du.numpy(), dx.numpy(), dp.numpy())
        dx = dx[0] if blocks == 1 else dx.sum(0)
        dp = dp.sum(0).float()  # (K, 2 + N + R, D)
        d_ds = dp[:, 0].reshape(k * d)
        d_bias = dp[:, 1].contiguous()
        # A_logs' own strides: for N = 1 the reshape is a view with strides (1, D), which .contiguous() keeps (a
        # size-1 axis) and DDP warns about ("Grad strides do not match bucket view strides")
        d_alogs = (dp[:, 2:2 + nstate] * a).transpose(1, 2).reshape(k * d, nstate)  # dA/dA_logs = A
        d_alogs = d_alogs.clone(memory_format=torch.contiguous_format)
        d_wdt = dp[:, 2 + nstate:].transpose(1, 2).contiguous()  # (K, D, R)
        return du, dx, d_wdt, d_bias, d_alogs, d_ds, None


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def _x_proj(u_l: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """u_l (B, L, D) @ weight (C, D).T in fp32 even under a bf16 autocast: x_proj's output sets the scan's step
    sizes (models.precision's policy), and in bf16 it also cost two full-map casts per direction."""
    with torch.autocast("cpu", enabled=False):
        return F.linear(u_l, weight)


def cross_selective_scan_fused(u, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, scan="auto",
                               low_memory=False):
    """The fused CPU kernel pair; same signature and result as `cross_selective_scan_reference` (`scan` is
    accepted for that and ignored: the kernel is its own scan). Inputs of other dtypes run in fp32."""
    if u.device.type != "cpu":
        raise ValueError("the fused SS2D kernel needs CPU tensors; use impl='auto' or 'reference'")
    b, h, w, d = u.shape
    k, c2 = K_DIRECTIONS, x_proj_weight.shape[1]
    u_l = _f32(u).view(b, h * w, d)  # (B, L, D)
    wx = x_proj_weight.to(torch.float32)
    params = (dt_projs_weight, dt_projs_bias, A_logs, Ds)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, x_proj_weight, *params))
    if needs_grad or not low_memory:
        xdbl = _x_proj(u_l, wx.reshape(k * c2, d)).view(b, h * w, k, c2)  # (B, L, K, R+2N)
        if needs_grad:
            y = _FusedFn.apply(u_l, xdbl, *params, (h, w))
        else:
            y = torch.empty_like(u_l)
            _run_fwd(_fused_kernels(), u_l, xdbl, torch.arange(k), (h, w), _kernel_params(*params), True, None, y)
        return y.view(b, h, w, d)
    kern, kparams = _fused_kernels(), _kernel_params(*params)
    y = torch.empty_like(u_l)
    for j in range(k):  # one direction's x_dbl at a time
        xdbl = _x_proj(u_l, wx[j]).view(b, h * w, 1, c2)
        _run_fwd(kern, u_l, xdbl, torch.tensor([j]), (h, w), kparams, j == 0, None, y)
        del xdbl
    return y.view(b, h, w, d)


def cross_selective_scan(u, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, impl="auto", scan="auto",
                         low_memory=False):
    """Dispatch: `impl` one of SS2D_IMPLS ('auto': fused on CPU, the reference elsewhere)."""
    if impl not in SS2D_IMPLS:
        raise ValueError(f"unknown SS2D implementation {impl!r}; valid: {', '.join(SS2D_IMPLS)}")
    if impl == "auto":
        impl = "fused" if u.device.type == "cpu" else "reference"
    fn = cross_selective_scan_fused if impl == "fused" else cross_selective_scan_reference
    return fn(u, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, scan=scan, low_memory=low_memory)
