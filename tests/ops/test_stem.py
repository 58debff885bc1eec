"""The fused CPU stem head (conv 3x3 stride 2, LayerNorm, GELU) against torch's layers, its spec: odd shapes,
batches, both stem widths; when it applies; and the model-level result with and without it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_vssm.models import create_model
from wsi_vssm.models import vssm as vssm_module
from wsi_vssm.ops.stem import stem_head_fused, use_fused_stem


def torch_head(x, conv, norm):
    y = conv(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
    return F.gelu(F.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias, norm.eps)).permute(0, 3, 1, 2)


def layers(cin, cout, seed):
    torch.manual_seed(seed)
    conv, norm = nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.LayerNorm(cout)
    with torch.no_grad():  # an affine away from (1, 0) so that it matters
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    return conv, norm


@pytest.mark.parametrize("batch,cin,h,w,cout", [
    (1, 3, 1, 1, 16), (2, 3, 1, 9, 16), (1, 3, 10, 1, 16), (2, 3, 7, 5, 16), (1, 3, 33, 64, 48), (1, 1, 6, 8, 8),
])
def test_fused_head_matches_torch_layers(batch, cin, h, w, cout):
    conv, norm = layers(cin, cout, seed=h * 100 + w)
    x = torch.randn(batch, cin, h, w) * 2.0
    with torch.no_grad():
        expected = torch_head(x, conv, norm)
        got = stem_head_fused(x, conv, norm)
    assert got.shape == expected.shape == (batch, cout, (h + 1) // 2, (w + 1) // 2)
    assert got.permute(0, 2, 3, 1).is_contiguous()  # channels-last strides, like the torch path
    err = (got - expected).abs().max().item()
    assert err < 1e-5, f"max abs difference {err:.3g}"


def test_fused_head_applies_only_to_fp32_cpu_inference():
    conv, _ = layers(3, 16, seed=0)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert use_fused_stem(x, conv)
        assert not use_fused_stem(x.double(), conv)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not use_fused_stem(x, conv)
    assert not use_fused_stem(x, conv)  # autograd on: torch's layers, which have gradients
    with torch.no_grad():
        assert not use_fused_stem(x, nn.Conv2d(3, 16, 3, stride=1, padding=1))


def test_model_features_same_with_and_without_the_fused_stem(monkeypatch):
    model = create_model("micro", num_classes=0).eval()
    x = torch.rand(2, 3, 97, 130)
    with torch.no_grad():
        fused = model.forward_features(x)
        monkeypatch.setattr(vssm_module, "use_fused_stem", lambda *a: False)
        plain = model.forward_features(x)
    err = (fused - plain).abs().max().item()
    assert err < 1e-4 * plain.abs().max().item(), f"max abs difference {err:.3g}"


def test_importing_the_package_asks_torch_for_huge_pages_unless_told_not_to():
    code = "import os, wsi_vssm; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], env={**env, "THP_MEM_ALLOC_ENABLE": "0"},
                         capture_output=True, text=True, check=True)
    assert (on.stdout.strip(), off.stdout.strip()) == ("1", "0")
