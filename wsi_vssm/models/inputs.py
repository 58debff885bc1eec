"""What every backbone here takes and gives: the image normalisation and the output stride.

`IMAGE_MEAN`, `IMAGE_STD` and `to_tensor` are defined here and nowhere else (VMamba's release weights and our
PCam fine-tuning both use ImageNet statistics); `STRIDE` is VSSM's last-stage stride.
"""

from __future__ import annotations

import numpy as np

from wsi_vssm.errors import UsageError

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
STRIDE = 32  # VSSM's last-stage stride: one token per 32 x 32 input px


def to_tensor(rgb: np.ndarray):
    """An H x W x 3 uint8 RGB image -> a (1, 3, H, W) float32 tensor in [0, 1], normalised by IMAGE_MEAN/STD."""
    import torch

    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise UsageError(f"to_tensor needs an H x W x 3 uint8 image, got {a.shape} {a.dtype}")
    if not (a.flags.c_contiguous and a.flags.writeable):
        a = np.array(a)  # torch cannot wrap read-only memory; a crop is not contiguous anyway
    t = torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return t.sub_(mean).div_(std)



def normalise_batch(x01):
    """(B, 3, H, W) RGB in [0, 1] -> the backbone's input (IMAGE_MEAN, IMAGE_STD)."""
    import torch

    mean = torch.tensor(IMAGE_MEAN, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=x01.device).view(1, 3, 1, 1)
    return (x01 - mean) / std
