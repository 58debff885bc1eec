"""Batch augmentation for H&E patches, in torch on (B, 3, H, W) float RGB in [0, 1].

Scanners and labs differ mostly in stain: we jitter each image in HED space (colour deconvolution with the
Ruifrok & Johnston haematoxylin / eosin / DAB optical-density vectors), then brightness, contrast, saturation,
an occasional light blur, and one of the 8 flips/rotations (tissue has no orientation). Every random draw comes
from the given `torch.Generator`, so a seed fixes the result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from wsi_vssm.io import tissue as _tissue

# The Ruifrok & Johnston stain matrix (io.tissue owns the numbers), as tensors.
RGB_FROM_HED = torch.from_numpy(_tissue.RGB_FROM_HED).float()  # hed @ M -> od
HED_FROM_RGB = torch.from_numpy(_tissue.HED_FROM_RGB).float()
_OD_EPS = 1.0 / 255  # keeps -log finite on black pixels


@dataclass
class AugmentConfig:
    flip_rot: bool = True
    hed_scale: float = 0.05  # stain amount x U(1 - s, 1 + s), per image and stain
    hed_shift: float = 0.02  # stain amount + U(-b, b) in OD units
    brightness: float = 0.08  # + U(-b, b)
    contrast: float = 0.1  # x U(1 - c, 1 + c) about the image mean
    saturation: float = 0.1  # x U(1 - s, 1 + s) about the grey value
    blur_p: float = 0.1  # chance of a 3x3 Gaussian blur (sigma ~0.8 px)

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, *shape) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand((n, *shape), generator=g)


def hed_jitter(x: torch.Tensor, scale: float, shift: float, g: torch.Generator) -> torch.Tensor:
    """Per-image, per-stain scale/shift of the HED concentrations. (B, 3, H, W) -> same."""
    b = x.shape[0]
    od = -torch.log(x.clamp_min(_OD_EPS))  # (B, 3, H, W) optical density
    hed = torch.einsum("bchw,cd->bdhw", od, HED_FROM_RGB)
    alpha = _uniform(b, 1 - scale, 1 + scale, g, 3, 1, 1)
    beta = _uniform(b, -shift, shift, g, 3, 1, 1)
    od = torch.einsum("bdhw,dc->bchw", hed * alpha + beta, RGB_FROM_HED)
    return torch.exp(-od).clamp(0, 1)


def colour_jitter(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    x = x + _uniform(b, -cfg.brightness, cfg.brightness, g, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, g, 1, 1, 1) + mean
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (x - grey) * _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, g, 1, 1, 1) + grey
    return x.clamp(0, 1)


def _blur(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    pick = torch.rand(x.shape[0], generator=g) < p
    if not pick.any():
        return x
    k1 = torch.tensor([0.25, 0.5, 0.25])
    k = (k1[:, None] * k1[None, :]).expand(3, 1, 3, 3)
    x = x.clone()
    x[pick] = F.conv2d(F.pad(x[pick], (1, 1, 1, 1), mode="replicate"), k, groups=3)
    return x


def dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One of the 8 flips/rotations per image (square images only: rotations keep H = W)."""
    code = torch.randint(0, 8, (x.shape[0],), generator=g)
    out = x.clone()
    for c in code.unique().tolist():
        sel = code == c
        y = torch.rot90(x[sel], c % 4, dims=(2, 3))
        out[sel] = y.flip(3) if c >= 4 else y
    return out


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) uint8 or float in [0, 1] -> float32 (B, 3, H, W) in [0, 1], augmented. fp32 even when called
    under a training step's bf16 autocast: the colour matmuls and the blur are data, not model."""
    with torch.autocast(x.device.type, enabled=False):
        return _augment(x, cfg, g)


def _augment(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if cfg.hed_scale > 0 or cfg.hed_shift > 0:
        x = hed_jitter(x, cfg.hed_scale, cfg.hed_shift, g)
    x = colour_jitter(x, cfg, g)
    if cfg.blur_p > 0:
        x = _blur(x, cfg.blur_p, g)
    if cfg.flip_rot and x.shape[2] == x.shape[3]:
        x = dihedral(x, g)
    return x
