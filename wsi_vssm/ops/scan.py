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
All accumulation is fp32; the output has u's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


IMPLS = ("auto", "reference", "cpu", "mamba_ssm", "triton")


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    impl="auto", initial_state=None,
):
    """Run the selective scan with implementation `impl` (one of IMPLS; 'auto' picks by device)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown scan implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    # Dispatch to the fused implementations is added with them; until then everything is the reference.
    return selective_scan_reference(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state=initial_state
    )
