"""Numeric precision of the backbone: fp32, or bf16 where the hardware has it.

    dtype = resolve_precision("auto", device)          # torch.float32 or torch.bfloat16
    with autocast(dtype, device):                       # a no-op for fp32
        feats = model.forward_features(x)               # weights stay fp32 (training keeps fp32 masters)

bf16 runs the backbone's matmuls and convolutions in bf16 under `torch.autocast`, except where rounding costs
agreement (`models.layers.autocast_off`): the stem, and SS2D's path into the scan (in_proj, the depthwise conv,
x_proj, dt_proj) stay fp32, as do LayerNorm, the scan and the residual stream between blocks. So out_proj, the
MLP and the downsample convolutions (most of the FLOPs) run bf16. With everything in bf16 the default model's
cell probabilities moved by up to 0.029 on the sample slides; with this split, by up to 0.003 (docs/scan.md).
It can pay only where the hardware multiplies bf16 natively: on CPUs with AMX-BF16 or AVX512-BF16 (detected at
run time from the CPU flags), on CUDA devices with bf16 support. Measured on an AVX512-BF16 CPU without AMX
(AMD Zen 4, `bench/backbone.py --speed`, 2026-12-03; docs/scan.md): `micro` inference 1.06x (its GEMMs are about a
third of its time), `tiny` 1.35x, a `micro` training step 1.29x.

Choices (`PRECISIONS`):
    fp32  always fp32.
    bf16  bf16; on a device without bf16 support it FALLS BACK to fp32 with one warning per process. Why not
          refuse: bf16 is a speed request, not a different model; emulated bf16 is slower than fp32 and less
          accurate, so fp32 is the better way to honour it, and a run configured on one machine (a cohort run on
          mixed Dask workers, a saved run config) must still complete on another.
    auto  bf16 where supported, else fp32, silently (logged once at info). The commands keep fp32 as their
          default: bf16's agreement is measured and within target, but for the default `micro` model it buys
          only about 1.06x on a CPU without AMX, so auto is an opt-in (larger models gain more).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings

import torch

from wsi_vssm.errors import UsageError

log = logging.getLogger("wsi_vssm.models")

PRECISIONS = ("fp32", "bf16", "auto")
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_WARNED: set[str] = set()


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's native-bf16 feature flags found (amx_bf16, avx512_bf16), from torch's own probe when it has
    one, else /proc/cpuinfo; () when none or unknown."""
    found = []
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    cpu = getattr(torch._C, "_cpu", None)
    for flag, probe in probes.items():
        fn = getattr(cpu, probe, None)
        if fn is not None:
            try:
                if fn():
                    found.append(flag)
            except RuntimeError:
                pass
    if found:
        return tuple(found)
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ()
    return tuple(flag for flag in _BF16_FLAGS if flag in flags)


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether `device` multiplies bf16 natively (CPU: AMX-BF16 or AVX512-BF16; CUDA: compute capability)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_bf16_flags())
    return False


def check_precision(precision: str) -> str:
    """`precision` when it is one of PRECISIONS; otherwise a UsageError that lists them."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    return precision


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """'fp32' | 'bf16' | 'auto' -> torch.float32 or torch.bfloat16 for `device` (rules in the module doc).
    An unknown name raises UsageError listing the valid ones."""
    check_precision(precision)
    device = torch.device(device)
    if precision == "fp32":
        return torch.float32
    if bf16_supported(device):
        return torch.bfloat16
    if precision == "bf16" and device.type not in _WARNED:
        _WARNED.add(device.type)
        what = "AMX-BF16 or AVX512-BF16" if device.type == "cpu" else "bf16 support"
        warnings.warn(f"--precision bf16: this {device.type} has no {what}; running in fp32", stacklevel=2)
    elif precision == "auto":
        log.info("precision auto on %s: fp32 (no native bf16)", device.type)
    return torch.float32


def autocast(dtype: torch.dtype, device: torch.device | str = "cpu"):
    """A context that runs the model's matmuls and convolutions in `dtype` (torch.autocast); a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


__all__ = ["PRECISIONS", "check_precision", "resolve_precision", "autocast", "bf16_supported", "cpu_bf16_flags"]
