"""Channels-last blocks: Linear2d and LayerNorm2d give today's values on NHWC maps without permute copies, and
the fused model keeps its maps channels-last from the stem to the last stage."""

from __future__ import annotations

import torch

from wsi_vssm.models import create_model
from wsi_vssm.models.layers import LayerNorm2d, Linear2d


def test_linear2d_and_layernorm2d_on_channels_last():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7)
    xl = x.contiguous(memory_format=torch.channels_last)
    for layer in (Linear2d(6, 4), LayerNorm2d(6)):
        ref, out = layer(x), layer(xl)
        assert torch.allclose(out, ref, atol=1e-6)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert out.permute(0, 2, 3, 1).is_contiguous()  # the (B, H, W, C) view is free


def test_fused_model_runs_channels_last_inside():
    torch.manual_seed(0)
    model = create_model("micro", num_classes=0).eval()
    formats = []
    hooks = [b.register_forward_hook(lambda m, a, out: formats.append(out.is_contiguous(
        memory_format=torch.channels_last))) for stage in model.layers for b in stage.blocks]
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 70, 90))
    for h in hooks:
        h.remove()
    assert formats and all(formats)
    assert out.is_contiguous()  # NCHW out, whatever ran inside
