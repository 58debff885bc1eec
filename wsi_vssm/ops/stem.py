"""The VSSM stem's first three layers (Conv2d 3x3 stride 2, LayerNorm over channels, GELU) as one CPU kernel.

    stem_head_fused(x, conv, norm) -> (B, C, ceil(H / 2), ceil(W / 2)), channels-last strides

x is the NCHW fp32 input on the CPU, `conv` the stem's nn.Conv2d and `norm` its LayerNorm2d. The kernel
(kernels/stem_cpu.py) reads x as it is and writes the normalised, activated map once, channels last: torch's
four passes (channels-last copy of the input, convolution, LayerNorm, GELU) took 142 ms of micro's 1.5 s
forward at 2,048 px, 104 ms with the kernel. Inference only: `use_fused_stem` says when it applies (no
autograd, fp32, CPU, no autocast); otherwise the caller runs the torch layers, which are the spec (tests
compare the two).
"""

from __future__ import annotations

import torch

from wsi_vssm.ops import scan as _scan


def _kernel():
    return _scan.numba_kernel_module("stem_cpu", "the fused CPU stem")


def use_fused_stem(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """The fused stem applies to fp32 CPU inference without autocast, for the stem's 3x3 stride-2 conv."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and conv.kernel_size == (3, 3) and conv.stride == (2, 2)
            and conv.padding == (1, 1) and conv.groups == 1 and conv.dilation == (1, 1) and conv.bias is not None)


@torch.no_grad()
def stem_head_fused(x: torch.Tensor, conv: torch.nn.Conv2d, norm: torch.nn.LayerNorm) -> torch.Tensor:
    kern = _kernel()
    b, _, h, w = x.shape
    cout = conv.out_channels
    out = _scan._empty((b, (h + 1) // 2, (w + 1) // 2, cout), torch.float32)  # (B, H', W', C)
    weight = conv.weight.detach().float().permute(1, 2, 3, 0).contiguous()  # (Cin, 3, 3, Cout)
    with _scan._CPU_LOCK:
        _scan._set_numba_threads()
        kern.stem_conv_norm_gelu(x.detach().contiguous().numpy(), weight.numpy(), conv.bias.detach().float().numpy(),
                                 norm.weight.detach().float().numpy(), norm.bias.detach().float().numpy(),
                                 float(norm.eps), out.numpy())
    return out.permute(0, 3, 1, 2)
