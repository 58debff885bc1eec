"""The `chunked` selective scan: pure PyTorch, parallel within chunks (log-space segment sums), exact,
differentiable by autograd and exportable to ONNX. Same signature and semantics as
`wsi_vssm.ops.scan.selective_scan_reference` (shapes in `wsi_vssm.ops.scan`); dispatched from there."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _as_groups(X: torch.Tensor) -> torch.Tensor:
    """(batch, N, L) -> (batch, 1, N, L) view; grouped tensors unchanged."""
    return X.unsqueeze(1) if X.dim() == 3 else X


CHUNK = 32
_BLOCK_ELEMENTS = 1 << 23  # cap on one block's (.., T, T) temporary: bounds the chunked path's extra memory


def _segsum_decay(S: torch.Tensor) -> torch.Tensor:
    """S (..., T) non-increasing cumulative log-decays -> (..., T, T) with [t, s] = exp(S_t - S_s) for t >= s,
    0 above the diagonal. The mask is applied before exp: above it S_t - S_s > 0 and exp may overflow."""
    T = S.shape[-1]
    seg = S[..., :, None] - S[..., None, :]
    lower = torch.ones(T, T, dtype=torch.bool, device=S.device).tril()
    return torch.exp(seg.masked_fill(~lower, float("-inf")))


def _chunked_block(dt, x, A, Bc, Cc, h0):
    """One block of chunks. dt, x: (b, G, cpg, nc, T); A: (G, cpg, N); Bc, Cc: (b, G, N, nc, T);
    h0: (b, G, cpg, N). Returns y (b, G, cpg, nc, T) and the block's last state (b, G, cpg, N)."""
    S = torch.cumsum(dt[:, :, :, None] * A[None, :, :, :, None, None], dim=-1)  # (b, G, cpg, N, nc, T) <= 0
    xB = x[:, :, :, None] * Bc[:, :, None]  # (b, G, cpg, N, nc, T)
    h_in = (_segsum_decay(S) @ xB.unsqueeze(-1)).squeeze(-1)  # states from a zero start at each chunk
    # Chunk boundaries: the same segment-sum trick one level up, over the chunks of this block.
    P = torch.cumsum(S[..., -1], dim=-1)  # (b, G, cpg, N, nc)
    h_end = (_segsum_decay(P) @ h_in[..., -1].unsqueeze(-1)).squeeze(-1) + torch.exp(P) * h0[..., None]
    h_start = torch.cat([h0[..., None], h_end[..., :-1]], dim=-1)  # (b, G, cpg, N, nc)
    h = h_in + torch.exp(S) * h_start[..., None]
    y = (h * Cc[:, :, None]).sum(3)
    return y, h_end[..., -1]


def _pad_last(X: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(X, (0, pad)) if pad else X


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, initial_state=None, chunk: int = CHUNK):
    """Pure-PyTorch chunked scan: exact (no approximation), differentiable by autograd, ONNX-exportable.

    Within a chunk of T steps the states come from a (T, T) matrix of decays exp(S_t - S_s), t >= s, where
    S is the cumulative sum of delta * A <= 0, so every exponent is <= 0; chunk boundaries use the same form
    over chunks. Work is T per element (vs 1 for the loop) but in large tensor ops; a Python loop runs only
    over blocks of chunks sized to bound memory (one block for typical exported shapes).
    """
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    Bg, Cg = _as_groups(B).float(), _as_groups(C).float()
    groups, nstate = Bg.shape[1], A.shape[1]
    cpg = dim // groups
    T = max(1, min(chunk, length))
    pad = (-length) % T
    nc = (length + pad) // T
    # Padded steps have dt = 0 and x = 0: the state passes through them unchanged.
    dt = _pad_last(delta, pad).reshape(batch, groups, cpg, nc, T)
    x = dt * _pad_last(u, pad).reshape(batch, groups, cpg, nc, T)
    Bc = _pad_last(Bg, pad).reshape(batch, groups, nstate, nc, T)
    Cc = _pad_last(Cg, pad).reshape(batch, groups, nstate, nc, T)
    Ag = A.float().reshape(groups, cpg, nstate)
    h = (torch.zeros(batch, dim, nstate, device=u.device) if initial_state is None
         else initial_state.float()).reshape(batch, groups, cpg, nstate)
    per_block = max(1, _BLOCK_ELEMENTS // max(1, batch * dim * nstate * T * T))
    ys = []
    for c0 in range(0, nc, per_block):
        sl = slice(c0, min(nc, c0 + per_block))
        yb, h = _chunked_block(dt[:, :, :, sl], x[:, :, :, sl], Ag, Bc[:, :, :, sl], Cc[:, :, :, sl], h)
        ys.append(yb)
    y = (ys[0] if len(ys) == 1 else torch.cat(ys, dim=3)).reshape(batch, dim, nc * T)[..., :length]
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, h.reshape(batch, dim, nstate)) if return_last_state else y
