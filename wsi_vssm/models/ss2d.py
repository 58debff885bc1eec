"""SS2D, the 2D selective-scan mixer of VMamba v2 (forward type "v05_noz"), channel-first.

    x (B, C, H, W) -> in_proj (C -> D) -> depthwise 3x3 conv -> SiLU = u (B, D, H, W)
      -> four scan orders (ops.cross_scan) -> per direction k: x_proj[k] -> dt_low (R), B (N), C (N);
         dt_projs[k]: dt_low -> D; selective scan with delta = softplus(dt + bias), A = -exp(A_logs), skip Ds
      -> merge the four back to (B, D, H, W) -> out_norm (LN over D) -> out_proj (D -> C)

Two implementations (`impl`, see `wsi_vssm.ops.ss2d_fused`):
- fused (the default on CPU with scan 'auto' or 'cpu'): channels-last end to end. in_proj and out_proj are GEMMs
  on (B, H, W, C), the depthwise conv runs on the channels-last map, out_norm normalises the contiguous last
  axis, and one numba kernel pair does dt_proj, softplus, the four scans, the D skip and the merge by index
  arithmetic (x_proj is one GEMM over the map). With autograd off on a large map it runs in row bands and one
  direction at a time, so its extra memory is u, the merged map and one direction's x_proj output.
- reference (today's path, the spec; any device, dtype and scan): channel-first, in two variants:
  - plain: cross-scans the whole map and runs one grouped scan over all four directions (training, small maps);
  - streaming (linear memory): walks each direction in sequence chunks, gathers only the chunk's pixels,
    carries the scan state between chunks and adds each chunk's output straight into the merged map. Its extra
    memory is a few chunk-sized temporaries beyond u and the merged map.
Either streams by default when autograd is off and H * W >= `stream_min_pixels`.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_vssm.models.layers import LayerNorm2d, Linear2d, autocast_off, row_bands
from wsi_vssm.ops.cross_scan import K_DIRECTIONS, cross_merge, cross_scan, scan_positions
from wsi_vssm.ops.scan import IMPLS, selective_scan
from wsi_vssm.ops.ss2d_fused import SS2D_IMPLS, cross_selective_scan_fused

log = logging.getLogger("wsi_vssm.models")

# Streaming defaults: maps of 256 x 256 pixels or more (a 1024 px region at stride 4) stream when autograd is
# off. Below that the plain path is faster (about 2x on CPU) and its ~17 inner maps are small (for micro's
# stage 1, D = 64: ~270 MB at 256 x 256). Chunks of 4096 positions keep temporaries at a few MB per 100 channels.
DEFAULT_STREAM_MIN_PIXELS = 256 * 256
DEFAULT_STREAM_CHUNK = 4096
# On a GPU each chunk costs a few dozen kernel launches: bench/gpu.py measured tiny on a 10,000 px region at
# 8.3 s with 4096-position chunks and 1.8 s with 262,144 (H200; peak memory 16.9 -> 17.9 GiB).
DEFAULT_STREAM_CHUNK_CUDA = 1 << 18


def resolve_dt_rank(dt_rank: int | str, d_model: int) -> int:
    """'auto' -> ceil(d_model / 16) as upstream; an int is taken as is."""
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    if isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 1:
        raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
    return dt_rank


def check_scan_impl(scan: str) -> str:
    """The scan implementation name, or a ValueError listing the valid ones."""
    if scan not in IMPLS:
        raise ValueError(f"unknown scan implementation {scan!r}; valid: {', '.join(IMPLS)}")
    return scan


def check_ss2d_impl(impl: str) -> str:
    """The SS2D implementation name, or a ValueError listing the valid ones."""
    if impl not in SS2D_IMPLS:
        raise ValueError(f"unknown SS2D implementation {impl!r}; valid: {', '.join(SS2D_IMPLS)}")
    return impl


class SS2D(nn.Module):
    """2D selective scan over a (B, C, H, W) map; returns (B, C, H, W)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        scan: str = "auto",
        stream_min_pixels: int | None = DEFAULT_STREAM_MIN_PIXELS,
        stream_chunk: int = DEFAULT_STREAM_CHUNK,
        stream_chunk_cuda: int = DEFAULT_STREAM_CHUNK_CUDA,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        impl: str = "auto",
    ):
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        rank = resolve_dt_rank(dt_rank, d_model)
        k = K_DIRECTIONS
        self.d_model, self.d_inner, self.d_state, self.dt_rank = d_model, d_inner, d_state, rank
        self.scan = check_scan_impl(scan)
        self.impl = check_ss2d_impl(impl)
        self.stream_min_pixels = stream_min_pixels
        self.stream_chunk, self.stream_chunk_cuda = stream_chunk, stream_chunk_cuda
        self._dt_range = (dt_min, dt_max, dt_init_floor)
        # Registration order mirrors upstream's state_dict order (own parameters first, then submodules).
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, d_inner))  # (K, R+2N, D)
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))  # (K*D, N)
        self.Ds = nn.Parameter(torch.empty(k * d_inner))  # (K*D,)
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, rank))  # (K, D, R)
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))  # (K, D)
        self.out_norm = LayerNorm2d(d_inner)
        self.in_proj = Linear2d(d_model, d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=False)
        self.out_proj = Linear2d(d_inner, d_model, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """VMamba's init of the SSM parameters (Linear/LN layers are initialised by the backbone)."""
        if self.A_logs.is_meta:  # a shape-only model (models.slide_model checks a file's shapes so): no values,
            return  # and the meta kernels of these ops load torch's Python decompositions (0.8 s, once a process)
        dt_min, dt_max, floor = self._dt_range
        bound = self.d_inner**-0.5
        self.x_proj_weight.uniform_(-bound, bound)
        self.dt_projs_weight.uniform_(-(self.dt_rank**-0.5), self.dt_rank**-0.5)
        # dt log-uniform in [dt_min, dt_max], then the bias is its inverse softplus: softplus(bias) = dt.
        rand = torch.rand(self.dt_projs_bias.shape, device=self.dt_projs_bias.device)
        dt = torch.exp(rand * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        n = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_logs.device)
        self.A_logs.copy_(torch.log(n).expand_as(self.A_logs))  # A[c, n] = -(n + 1)
        self.Ds.fill_(1.0)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, "
            f"scan={self.scan!r}, impl={self.impl!r}, stream_min_pixels={self.stream_min_pixels}, "
            f"stream_chunk={self.stream_chunk}, stream_chunk_cuda={self.stream_chunk_cuda}"
        )

    # ------------------------------------------------------------------ forward
    def use_streaming(self, height: int, width: int) -> bool:
        """The linear-memory path is the default when autograd is off and the map is large enough."""
        if torch.is_grad_enabled() or self.stream_min_pixels is None:
            return False
        return height * width >= self.stream_min_pixels

    def use_fused(self, x: torch.Tensor) -> bool:
        """The fused CPU kernel: asked for, or 'auto' on a CPU float tensor when the scan is 'auto' or 'cpu'
        (an explicitly chosen reference/chunked/GPU scan keeps today's path, which honours it)."""
        if self.impl == "fused":
            if x.device.type != "cpu":
                raise ValueError(f"SS2D impl 'fused' needs CPU tensors, got {x.device}; use impl 'auto'")
            return True
        return (self.impl == "auto" and x.device.type == "cpu" and self.scan in ("auto", "cpu")
                and x.dtype in (torch.float32, torch.bfloat16, torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        streaming = self.use_streaming(x.shape[2], x.shape[3])
        if self.use_fused(x):
            return self.forward_fused(x, low_memory=streaming)
        if streaming:
            return self.forward_streaming(x)
        return self.forward_plain(x)

    def forward_fused(self, x: torch.Tensor, low_memory: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W) channels-last, through the fused CPU kernel. low_memory (autograd off):
        the projections in row bands and the scan one direction at a time (memory linear in H * W)."""
        b, _, h, w = x.shape
        x = x.contiguous(memory_format=torch.channels_last)
        if low_memory and not torch.is_grad_enabled():
            return self._fused_bands(x, self.chunk_for(x))
        u = F.silu(self._conv_in(x))  # (B, D, H, W) channels-last
        y = self._fused_scan(u, low_memory=False)  # (B, H, W, D)
        y = F.layer_norm(y, (self.d_inner,), self.out_norm.weight, self.out_norm.bias, self.out_norm.eps)
        return F.linear(y, self.out_proj.weight, self.out_proj.bias).permute(0, 3, 1, 2)  # (B, C, H, W)

    def _fused_scan(self, u: torch.Tensor, low_memory: bool) -> torch.Tensor:
        """u (B, D, H, W) channels-last -> merged scan output (B, H, W, D)."""
        return cross_selective_scan_fused(
            u.permute(0, 2, 3, 1), self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs,
            self.Ds, low_memory=low_memory,
        )

    def _fused_bands(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """forward_fused without autograd: extra memory u + the merged map + one direction's x_proj output."""
        u = self._project_bands(x, chunk, memory_format=torch.channels_last)  # (B, D, H, W)
        y = self._fused_scan(u, low_memory=True)  # (B, H, W, D)
        del u
        out = x.new_empty(x.shape[0], x.shape[2], x.shape[3], self.d_model)  # (B, H, W, C)
        for r0, r1 in row_bands(x.shape[2], x.shape[3], chunk):
            band = F.layer_norm(y[:, r0:r1], (self.d_inner,), self.out_norm.weight, self.out_norm.bias,
                                self.out_norm.eps)
            dest = out[:, r0:r1]
            if dest.is_contiguous() and not torch.is_autocast_enabled(dest.device.type):
                # batch 1: the GEMM writes the band in place, no copy
                flat, weight, bias = dest.view(-1, self.d_model), self.out_proj.weight.t(), self.out_proj.bias
                if bias is None:
                    torch.mm(band.reshape(-1, self.d_inner), weight, out=flat)
                else:
                    torch.addmm(bias, band.reshape(-1, self.d_inner), weight, out=flat)
            else:
                dest.copy_(F.linear(band, self.out_proj.weight, self.out_proj.bias))
        return out.permute(0, 3, 1, 2)

    def _conv_in(self, x: torch.Tensor) -> torch.Tensor:
        """conv2d(in_proj(x)), SiLU's input; in fp32 even under autocast (`autocast_off`)."""
        with autocast_off(x):
            return self.conv2d(self.in_proj(x.to(self.in_proj.weight.dtype)))

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W), materialising the four scan orders (differentiable)."""
        u = F.silu(self._conv_in(x))  # (B, D, H, W)
        y = self.scan_plain(u)  # (B, D, H, W)
        return self.out_proj(self.out_norm(y))

    def chunk_for(self, x: torch.Tensor) -> int:
        """Streaming chunk for x's device: small on CPU (cache-sized temporaries), large on a GPU (fewer launches)."""
        return self.stream_chunk_cuda if x.is_cuda else self.stream_chunk

    @torch.no_grad()
    def forward_streaming(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W) with memory linear in H * W: u and the merged map plus chunk temporaries."""
        chunk = chunk or self.chunk_for(x)
        if self.use_fused(x):
            return self._fused_bands(x.contiguous(memory_format=torch.channels_last), chunk)
        u = self._project_bands(x, chunk)  # (B, D, H, W)
        y = self.scan_streaming(u, chunk)  # (B, D, H, W)
        del u
        out = x.new_empty(x.shape[0], self.d_model, x.shape[2], x.shape[3])  # (B, C, H, W)
        for r0, r1 in row_bands(x.shape[2], x.shape[3], chunk):  # norm and projection are per pixel
            out[:, :, r0:r1] = self.out_proj(self.out_norm(y[:, :, r0:r1]))
        return out

    def _project_bands(self, x: torch.Tensor, chunk: int, memory_format=torch.contiguous_format) -> torch.Tensor:
        """u = SiLU(conv(in_proj(x))) computed in row bands with a one-row halo, so no full-size temporaries.
        The conv zero-pads each band (rows lo..hi) like the whole map: at the map's border that is the map's own
        padding; inside, only the halo rows' outputs see it, and they are dropped. SiLU writes into u directly."""
        b, _, h, w = x.shape
        u = torch.empty(b, self.d_inner, h, w, dtype=self.in_proj.weight.dtype, device=x.device,
                        memory_format=memory_format)
        for r0, r1 in row_bands(h, w, chunk):
            lo, hi = max(r0 - 1, 0), min(r1 + 1, h)
            t = self._conv_in(x[:, :, lo:hi])  # (B, D, rows + halo, W): rows lo .. hi
            torch.ops.aten.silu.out(t[:, :, r0 - lo:r1 - lo], out=u[:, :, r0:r1])
        return u

    # ------------------------------------------------------------------ the 2D scan on u
    def _ssm_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A (K*D, N) = -exp(A_logs), Ds (K*D,), delta bias (K*D,), all fp32."""
        return -torch.exp(self.A_logs.float()), self.Ds.float(), self.dt_projs_bias.float().reshape(-1)

    def scan_plain(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, D, H, W) -> merged scan output (B, D, H, W): one grouped scan over all four directions."""
        b, d, h, w = u.shape
        k, r, n = K_DIRECTIONS, self.dt_rank, self.d_state
        xs = cross_scan(u)  # (B, K, D, L)
        with autocast_off(u):  # the step sizes stay fp32 (`autocast_off`)
            x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)  # (B, K, R+2N, L)
            dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
            dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)  # (B, K, D, L)
        a, ds, bias = self._ssm_params()
        ys = selective_scan(
            xs.reshape(b, k * d, h * w), dts.reshape(b, k * d, h * w), a,
            bs.contiguous(), cs.contiguous(),  # (B, K, N, L): group k serves channels k*D .. k*D+D-1
            ds, delta_bias=bias, delta_softplus=True, impl=self.scan,
        )  # (B, K*D, L)
        return cross_merge(ys.view(b, k, d, h * w), h, w)

    @torch.no_grad()
    def scan_streaming(self, u: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Same as `scan_plain`, direction by direction and chunk by chunk, carrying the scan state.

        Extra memory beyond u and the returned map: per chunk u's gathered positions (B, D, n), dt (B, D, n),
        the scan output (B, D, n), B/C (B, N, n), an index (n,) and the carried state (B, D, N).
        """
        b, d, h, w = u.shape
        length, chunk = h * w, chunk or self.chunk_for(u)
        if chunk < 1:
            raise ValueError(f"stream chunk must be >= 1, got {chunk}")
        r, n = self.dt_rank, self.d_state
        u_flat = u.reshape(b, d, length)  # a view when u is contiguous
        # (B, D, L) the merged map; at least fp32, since the four directions are summed into it
        out = torch.zeros(u_flat.shape, dtype=torch.promote_types(u.dtype, torch.float32), device=u.device)
        impl = self.scan
        if impl == "mamba_ssm":  # its kernel cannot carry a state between chunks; auto picks one that can
            log.info("SS2D streaming: mamba_ssm takes no initial_state; chunks use scan impl 'auto'")
            impl = "auto"
        a, ds, bias = self._ssm_params()
        a, ds, bias = a.view(K_DIRECTIONS, d, n), ds.view(K_DIRECTIONS, d), bias.view(K_DIRECTIONS, d)
        for k in range(K_DIRECTIONS):
            state = None  # (B, D, N), zeros at the start of each direction
            for s in range(0, length, chunk):
                e = min(s + chunk, length)
                idx = scan_positions(k, h, w, s, e, device=u.device)  # (n_chunk,) pixel of each position
                uc = u_flat.index_select(2, idx)  # (B, D, n_chunk)
                with autocast_off(uc):  # the step sizes stay fp32 (`autocast_off`)
                    dbl = torch.matmul(self.x_proj_weight[k], uc)  # (B, R+2N, n_chunk)
                    dt_low, bc, cc = torch.split(dbl, [r, n, n], dim=1)
                    dt = torch.matmul(self.dt_projs_weight[k], dt_low)  # (B, D, n_chunk)
                yc, state = selective_scan(
                    uc, dt, a[k], bc.contiguous(), cc.contiguous(), ds[k], delta_bias=bias[k],
                    delta_softplus=True, return_last_state=True, impl=impl, initial_state=state,
                )
                out.index_add_(2, idx, yc.to(out.dtype))
        return out.view(b, d, h, w)
