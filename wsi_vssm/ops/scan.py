"""The selective scan with mamba-ssm's semantics, and the dispatch to its implementations.

Shapes (mamba-ssm's `selective_scan_fn`):
    u, delta, z:  (batch, D, L)
    A:            (D, N)                      real
    B, C:         (batch, N, L) or (batch, G, N, L) with D divisible by G (channels d use group d // (D // G))
    D:            (D,)      delta_bias: (D,)
    initial_state, last state: (batch, D, N)
Recurrence per channel d and state n, from h = initial_state (zeros by default):
    h_t = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B[n, t] * u_t
    y_t = sum_n C[n, t] * h_t[n] + D[d] * u_t ;  out = y * silu(z) when z is given.
All accumulation is fp32; the output has u's dtype; the last state is fp32.

Implementations (docs/scan.md has the measurements):
    reference  the plain loop over L: the spec.
    cpu        fused numba kernel (kernels/scan_cpu.py), forward and backward; float64 inputs run in float64.
    chunked    pure PyTorch, parallel within chunks (log-space segment sums): exports to ONNX, runs anywhere
               (`wsi_vssm.ops.scan_chunked`).
    mamba_ssm  mamba-ssm's CUDA kernel (extra [cuda]); it has no initial_state, so passing one raises.
    triton     our Triton kernels (kernels/scan_triton.py): tiled forward, fused backward.
    auto       CPU: cpu (numba is a core dependency; missing -> MissingDependency, never a slow path).
               CUDA: mamba_ssm, else triton, else chunked (with a warning), skipping mamba_ssm when
               initial_state is given. The choice is logged once per (device, choice).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import logging
import os
import sys
import threading

import torch
import torch.nn.functional as F

from wsi_vssm.errors import MissingDependency
from wsi_vssm.ops.scan_chunked import CHUNK, _as_groups, selective_scan_chunked

__all__ = ["IMPLS", "CHUNK", "selective_scan", "selective_scan_reference", "selective_scan_cpu",
           "selective_scan_chunked", "selective_scan_mamba_ssm", "selective_scan_triton"]

log = logging.getLogger("wsi_vssm.scan")

IMPLS = ("auto", "reference", "cpu", "chunked", "mamba_ssm", "triton")
CUDA_INSTALL = 'pip install "wsi-vssm[cuda]"'


def _expand_groups(X: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, D, N, L), fp32."""
    X = X.float()
    if X.dim() == 3:
        return X.unsqueeze(1).expand(-1, dim, -1, -1)
    groups = X.shape[1]
    return X.repeat_interleave(dim // groups, dim=1)


def selective_scan_reference(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    initial_state=None,
):
    """A plain sequential loop over L: the spec every other implementation is tested against."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    A = A.float()
    Bx, Cx = _expand_groups(B, dim), _expand_groups(C, dim)
    h = (
        u.new_zeros(batch, dim, A.shape[1])
        if initial_state is None
        else initial_state.float().clone()
    )
    ys = []
    for t in range(length):
        dA = torch.exp(delta[:, :, t, None] * A)  # (batch, D, N)
        h = dA * h + (delta[:, :, t] * u[:, :, t])[..., None] * Bx[:, :, :, t]
        ys.append((h * Cx[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


# ---------------------------------------------------------------------------------------------------------
# Argument checks (no asserts: these are user inputs)


def _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, D, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError("delta and z must have u's shape (batch, D, L)")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D, N) = ({dim}, N), got {tuple(A.shape)}")
    nstate = A.shape[1]
    for name, X in (("B", B), ("C", C)):
        ok = X.dim() in (3, 4) and X.shape[0] == batch and X.shape[-2:] == (nstate, length)
        if not ok or (X.dim() == 4 and (X.shape[1] == 0 or dim % X.shape[1])):
            raise ValueError(
                f"{name} must be (batch, N, L) or (batch, G, N, L) with D divisible by G; "
                f"got {tuple(X.shape)} for u {tuple(u.shape)}, N = {nstate}"
            )
    for name, X in (("D", D), ("delta_bias", delta_bias)):
        if X is not None and X.shape != (dim,):
            raise ValueError(f"{name} must be ({dim},), got {tuple(X.shape)}")
    if initial_state is not None and initial_state.shape != (batch, dim, nstate):
        raise ValueError(f"initial_state must be ({batch}, {dim}, {nstate}), got {tuple(initial_state.shape)}")


# ---------------------------------------------------------------------------------------------------------
# cpu: the fused numba kernel

_CPU_LOCK = threading.Lock()  # numba's workqueue threading layer (its fallback) must not be entered concurrently


def numba_kernel_module(name: str, what: str):
    """wsi_vssm_kernels.<name>, a numba kernel module; without numba a MissingDependency naming `what` and the
    install command (never a silent slow path)."""
    try:
        import numba  # noqa: F401
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and (err.name or "numba").split(".")[0] == "numba":
            raise MissingDependency(f"numba ({what})", "pip install numba") from err
        # installed, but it does not load: most often a numpy newer than it supports
        raise MissingDependency(f"numba ({what})", "pip install --upgrade numba", broken=str(err)) from err
    return importlib.import_module(f"wsi_vssm_kernels.{name}")


def _numba_kernels():
    return numba_kernel_module("scan_cpu", "the fast CPU scan")


def _set_numba_threads():
    """Numba's kernels use as many threads as torch (at most NUMBA_NUM_THREADS). The first call starts numba's
    pool; under its OpenMP layer that raises the process's OpenMP thread count, torch's included, to
    NUMBA_NUM_THREADS (a process started with OMP_NUM_THREADS=1 ran torch on 2 threads after the first kernel
    here), so torch's count is put back."""
    import numba

    torch_threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch_threads)))
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    return numba.get_num_threads()


def _cpu_dtype(u):
    return torch.float64 if u.dtype == torch.float64 else torch.float32


_HUGE = 1 << 21  # x86-64 / aarch64 transparent huge page
_HUGE_MAX = 256 << 20  # measured crossover on the dev VM, see _empty


@functools.cache
def _madvise():
    """libc's madvise (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return fn


def _empty(shape, dtype) -> torch.Tensor:
    """torch.empty, with the buffer's whole 2 MiB pages marked madvise(MADV_HUGEPAGE) before first touch (as
    numpy does for its large arrays) when it is 4 MiB .. 256 MiB. Every call's outputs are new memory (glibc
    unmaps large blocks on free), and a first-touch fault costs ~2.5 us per 4 KiB page on the dev VM: at
    L = 64k (200 MB y) the faults took as long as the scan; 2 MiB pages halve the forward's time there. Above
    ~256 MiB the huge-page faults measured slower than 4 KiB ones on that VM (fresh 2 MiB blocks appear to come
    back from the hypervisor: virtio-balloon), hence the cap (docs/scan.md, "Output allocation"). Advisory:
    without THP (or off Linux) it is plain torch.empty."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    madvise = _madvise() if 2 * _HUGE <= nbytes <= _HUGE_MAX else None
    if madvise is not None:
        lo = -(-t.data_ptr() // _HUGE) * _HUGE
        hi = (t.data_ptr() + nbytes) // _HUGE * _HUGE
        if hi > lo:
            madvise(lo, hi - lo, 14)  # MADV_HUGEPAGE; failure (THP off: EINVAL) changes nothing
    return t


def _np(X, dtype):
    """A contiguous tensor of `dtype` on X's device (zero-copy when it already is one), detached. New CPU
    buffers come from `_empty` (huge pages); a GPU tensor stays on its GPU (the Triton path)."""
    X = X.detach()
    if X.dtype == dtype and X.is_contiguous():
        return X
    if X.device.type != "cpu":
        return X.to(dtype).contiguous()
    return _empty(X.shape, dtype).copy_(X)


class _ScanCpuFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, softplus, need_grad):
        kern = _numba_kernels()
        dt = _cpu_dtype(u)
        batch, dim, length = u.shape
        nstate = A.shape[1]
        uf, df, Af = _np(u, dt), _np(delta, dt), _np(A, dt)
        Bf, Cf = _np(_as_groups(B), dt), _np(_as_groups(C), dt)
        Df = _np(D, dt) if D is not None else torch.zeros(dim, dtype=dt)
        bf = _np(delta_bias, dt) if delta_bias is not None else torch.zeros(dim, dtype=dt)
        zf = _np(z, dt) if z is not None else torch.zeros(1, 1, 1, dtype=dt)
        hf = _np(h0, dt) if h0 is not None else torch.zeros(batch, dim, nstate, dtype=dt)
        K = kern.CHUNK
        nck = -(-length // K) if need_grad else 1
        ckpt = torch.empty(batch, dim, nck, nstate, dtype=dt)
        y = _empty((batch, dim, length), dt)
        hlast = torch.empty(batch, dim, nstate, dtype=dt)
        with _CPU_LOCK:
            _set_numba_threads()
            kern.scan_fwd(uf.numpy(), df.numpy(), Af.numpy(), Bf.numpy(), Cf.numpy(), Df.numpy(), zf.numpy(),
                          bf.numpy(), hf.numpy(), softplus, z is not None, need_grad, K, y.numpy(),
                          hlast.numpy(), ckpt.numpy())
        if need_grad:
            ctx.save_for_backward(uf, df, Af, Bf, Cf, Df, zf, bf, ckpt)
            ctx.meta = (softplus, z is not None, K, B.shape, [x.dtype if x is not None else None
                                                              for x in (u, delta, A, B, C, D, z, delta_bias, h0)])
        return (y if u.dtype == dt else _empty(y.shape, u.dtype).copy_(y)), hlast

    @staticmethod
    def backward(ctx, dy, dlast):
        return _cpu_backward(ctx, dy, dlast)


def _cpu_backward(ctx, dy, dlast):
    kern = _numba_kernels()
    uf, df, Af, Bf, Cf, Df, zf, bf, ckpt = ctx.saved_tensors
    softplus, has_z, K, b_shape, dtypes = ctx.meta
    dt = uf.dtype
    batch, dim, length = uf.shape
    groups, nstate = Bf.shape[1], Af.shape[1]
    dyf = _np(dy, dt) if dy is not None else _empty(uf.shape, dt).zero_()
    dlf = _np(dlast, dt) if dlast is not None else torch.zeros(batch, dim, nstate, dtype=dt)
    du, ddelta = _empty(uf.shape, dt), _empty(uf.shape, dt)
    dz = _empty(uf.shape, dt) if has_z else torch.zeros(1, 1, 1, dtype=dt)
    dA = torch.empty(batch, dim, nstate, dtype=torch.float64)
    dD, dbias = torch.empty(batch, dim, dtype=torch.float64), torch.empty(batch, dim, dtype=torch.float64)
    dh0 = torch.empty(batch, dim, nstate, dtype=dt)
    with _CPU_LOCK:
        threads = _set_numba_threads()
        blocks = kern.backward_blocks(batch, groups, dim // groups, threads)
        dB = _empty((batch, groups, blocks, nstate, length), dt).zero_()
        dC = _empty(dB.shape, dt).zero_()
        kern.scan_bwd(uf.numpy(), df.numpy(), Af.numpy(), Bf.numpy(), Cf.numpy(), Df.numpy(), zf.numpy(),
                      bf.numpy(), dyf.numpy(), dlf.numpy(), ckpt.numpy(), softplus, has_z, K, blocks,
                      du.numpy(), ddelta.numpy(), dz.numpy(), dB.numpy(), dC.numpy(), dA.numpy(), dD.numpy(),
                      dbias.numpy(), dh0.numpy())
    dB = (dB[:, :, 0] if blocks == 1 else dB.sum(2)).reshape(b_shape)
    dC = (dC[:, :, 0] if blocks == 1 else dC.sum(2)).reshape(b_shape)
    grads = (du, ddelta, dA.sum(0), dB, dC, dD.sum(0), dz if has_z else None, dbias.sum(0), dh0)
    out = [
        (g if g.dtype == t else _empty(g.shape, t).copy_(g)) if (need and t is not None and g is not None) else None
        for g, t, need in zip(grads, dtypes, ctx.needs_input_grad, strict=False)
    ]
    return (*out, None, None)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    """Fused numba scan on CPU tensors, differentiable. Same signature and semantics as the reference."""
    if u.is_cuda:
        raise ValueError("the 'cpu' scan needs CPU tensors; use impl='auto' or a CUDA implementation")
    need = _needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)
    y, h = _ScanCpuFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), need)
    return (y, h) if return_last_state else y


# ---------------------------------------------------------------------------------------------------------
# GPU: mamba_ssm and triton (imported lazily)


def _import_mamba_ssm():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError) as err:  # OSError: a CUDA extension built against another torch
        raise MissingDependency("mamba-ssm (the CUDA scan)", CUDA_INSTALL) from err
    return selective_scan_fn


def selective_scan_mamba_ssm(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False, initial_state=None):
    """mamba-ssm's fused CUDA kernel. It has no initial state, so one is rejected rather than ignored."""
    if initial_state is not None:
        raise ValueError(
            "mamba_ssm's kernel does not take initial_state; use impl='triton' or 'chunked' (or 'auto', "
            "which skips mamba_ssm when initial_state is given)"
        )
    fn = _import_mamba_ssm()
    out = fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if return_last_state:
        y, h = out
        return y, h.float()
    return out


def _import_triton_kernel():
    try:
        from wsi_vssm_kernels import scan_triton
    except ImportError as err:
        raise MissingDependency("triton (the GPU scan kernel)", CUDA_INSTALL) from err
    return scan_triton


class _ScanTritonFn(torch.autograd.Function):
    """Triton forward and fused backward (kernels/scan_triton.py); the backward restarts from the states the
    forward saved at tile starts, never through `chunked`."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, softplus, need_grad):
        kern = _import_triton_kernel()
        batch, dim, _ = u.shape
        dev, f32 = u.device, torch.float32
        ins = (_np(u, f32), _np(delta, f32), _np(A, f32), _np(_as_groups(B), f32), _np(_as_groups(C), f32),
               _np(D, f32) if D is not None else torch.zeros(dim, device=dev),
               _np(z, f32) if z is not None else None,
               _np(delta_bias, f32) if delta_bias is not None else torch.zeros(dim, device=dev))
        h0f = _np(h0, f32) if h0 is not None else torch.zeros(batch, dim, A.shape[1], device=dev)
        out = kern.scan_fwd(*ins, h0f, softplus, save_states=need_grad)
        y, hlast = out[:2]
        if need_grad:
            ctx.save_for_backward(*ins, out[2])
            ctx.meta = (softplus, B.shape, [x.dtype if x is not None else None
                                            for x in (u, delta, A, B, C, D, z, delta_bias, h0)])
        return y.to(u.dtype), hlast

    @staticmethod
    def backward(ctx, dy, dlast):
        kern = _import_triton_kernel()
        u, delta, A, B, C, D, z, bias, hck = ctx.saved_tensors
        softplus, b_shape, dtypes = ctx.meta
        f32 = torch.float32
        dy = _np(dy, f32) if dy is not None else torch.zeros_like(u)
        dlast = _np(dlast, f32) if dlast is not None else hck.new_zeros(hck.shape[:3])
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = kern.scan_bwd(u, delta, A, B, C, D, z, bias, hck, dy, dlast,
                                                                   softplus)
        grads = (du, ddelta, dA, dB.reshape(b_shape), dC.reshape(b_shape), dD, dz, dbias, dh0)
        out = [g.to(t) if (need and t is not None and g is not None) else None
               for g, t, need in zip(grads, dtypes, ctx.needs_input_grad, strict=False)]
        return (*out, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, initial_state=None):
    """Triton kernel on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, for tests)."""
    if not u.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError("the 'triton' scan needs CUDA tensors (or TRITON_INTERPRET=1 for testing on CPU)")
    need = _needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)
    y, h = _ScanTritonFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), need)
    return (y, h) if return_last_state else y


# ---------------------------------------------------------------------------------------------------------
# Dispatch

_LOGGED: set[tuple[str, str]] = set()


def _log_once(device: str, impl: str, why: str, degraded: bool = False) -> None:
    if (device, impl) in _LOGGED:
        return
    _LOGGED.add((device, impl))
    (log.warning if degraded else log.info)("selective scan on %s: using %r (%s)", device, impl, why)


def _auto_cuda(initial_state) -> str:
    return _cuda_impl(initial_state is not None)


@functools.cache  # decided once per process: a failed import is not cached by Python and would rerun per scan
def _cuda_impl(has_initial_state: bool) -> str:
    reasons = []
    if not has_initial_state:
        try:
            _import_mamba_ssm()
            return "mamba_ssm"
        except MissingDependency as err:
            reasons.append(f"mamba_ssm unavailable ({err.__cause__!r})")
    else:
        reasons.append("mamba_ssm takes no initial_state")
    try:
        _import_triton_kernel()
        _log_once("cuda", "triton", "; ".join(reasons))
        return "triton"
    except MissingDependency:
        reasons.append(f"triton not installed; for the fused kernels: {CUDA_INSTALL}")
    _log_once("cuda", "chunked", "; ".join(reasons), degraded=True)
    return "chunked"


def _auto_impl(u, initial_state) -> str:
    if u.is_cuda:
        impl = _auto_cuda(initial_state)
        if impl == "mamba_ssm":
            _log_once("cuda", impl, "mamba-ssm CUDA kernel")
        return impl
    _numba_kernels()  # raises MissingDependency with the install command: never a silent slow path
    _log_once(u.device.type, "cpu", "fused numba kernel")
    return "cpu"


_IMPL_FNS = {
    "reference": selective_scan_reference,
    "cpu": selective_scan_cpu,
    "chunked": selective_scan_chunked,
    "mamba_ssm": selective_scan_mamba_ssm,
    "triton": selective_scan_triton,
}


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    impl="auto", initial_state=None,
):
    """Run the selective scan with implementation `impl` (one of IMPLS; 'auto' picks by device)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown scan implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if impl == "auto":
        impl = _auto_impl(u, initial_state)
    return _IMPL_FNS[impl](
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state=initial_state
    )
