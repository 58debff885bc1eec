"""The compute device by name: `cpu`, `cuda` or `auto`, resolved to what is used."""

from __future__ import annotations

from enum import Enum

from wsi_vssm.errors import UsageError


class Device(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"



def resolve_device(device: str) -> str:
    """'cpu', 'cuda' or 'auto' (cuda when available) -> 'cpu' or 'cuda'; unknown names list the valid ones."""
    import torch

    try:
        d = Device(str(device).lower())
    except ValueError:
        raise UsageError(f"unknown device {device!r}; choose one of: {', '.join(x.value for x in Device)}") from None
    if d is Device.AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d is Device.CUDA and not torch.cuda.is_available():
        raise UsageError("device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return d.value

