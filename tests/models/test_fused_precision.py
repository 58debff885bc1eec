"""Precision choice: fp32 / bf16 / auto, the fallback when the CPU has no native bf16, and a bf16 forward."""

from __future__ import annotations

import warnings

import pytest
import torch

from wsi_vssm.errors import UsageError
from wsi_vssm.models import create_model
from wsi_vssm.models import precision as prec
from wsi_vssm.ops.ss2d_fused import cross_selective_scan_fused


def test_resolve_precision(monkeypatch):
    with pytest.raises(UsageError, match="choose one of: fp32, bf16, auto"):
        prec.resolve_precision("fp16", "cpu")
    assert prec.resolve_precision("fp32", "cpu") == torch.float32
    monkeypatch.setattr(prec, "bf16_supported", lambda device: True)
    assert prec.resolve_precision("bf16", "cpu") == prec.resolve_precision("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(prec, "bf16_supported", lambda device: False)
    monkeypatch.setattr(prec, "_WARNED", set())
    assert prec.resolve_precision("auto", "cpu") == torch.float32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prec.resolve_precision("bf16", "cpu") == torch.float32
        assert prec.resolve_precision("bf16", "cpu") == torch.float32
    assert len(caught) == 1 and "running in fp32" in str(caught[0].message)  # one warning per process


def test_bf16_forward_close_to_fp32():
    torch.manual_seed(0)
    model = create_model("micro", num_classes=0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_features(x)
        with prec.autocast(torch.bfloat16, "cpu"):
            out = model.forward_features(x)
    assert out.shape == ref.shape
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("impl,stream", [("auto", False), ("auto", True), ("reference", False), ("reference", True)])
def test_bf16_keeps_the_stem_the_scan_inputs_and_the_residual_stream_fp32(impl, stream):
    """Under bf16 autocast only the GEMMs after the scan (out_proj, the MLP, the downsample conv) round to bf16:
    the stem and SS2D's in_proj, depthwise conv and projections run fp32, and every block adds into fp32."""
    torch.manual_seed(0)
    model = create_model("micro", num_classes=0, ss2d_impl=impl, stream_min_pixels=1 if stream else None).eval()
    seen = {}

    def record(name):
        return lambda _m, _a, out: seen.setdefault(name, set()).add(out.dtype)

    for name, m in model.named_modules():
        if name.endswith(("op.in_proj", "op.conv2d", "mlp.fc1", "patch_embed", "blocks")):
            m.register_forward_hook(record(name.split(".")[-1] if "." in name else name))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        stem = model.patch_embed(x)
        with prec.autocast(torch.bfloat16, "cpu"):
            out = model.forward_features(x)
            stem_bf16 = model._stem(x)
    assert seen["in_proj"] == seen["conv2d"] == seen["blocks"] == {torch.float32}
    assert seen["fc1"] == {torch.bfloat16}  # autocast still reaches the MLP
    assert out.dtype == torch.float32
    assert torch.allclose(stem_bf16, stem, atol=1e-5)


def test_bf16_training_step_has_fp32_gradients():
    torch.manual_seed(0)
    model = create_model("micro", num_classes=0).train()
    x = torch.randn(2, 3, 64, 64)
    with prec.autocast(torch.bfloat16, "cpu"):
        loss = model.forward_features(x).float().square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("low_memory", [False, True])
def test_fused_scan_projections_ignore_a_bf16_autocast(low_memory):
    """x_proj feeds the scan's step sizes, so the fused kernel's projections stay fp32 under autocast: its
    output is the same with autocast on and off (a bf16 x_proj moved it by ~1e-2 and cost two casts a direction)."""
    torch.manual_seed(0)
    op = create_model("micro", num_classes=0).layers[0].blocks[0].op
    u = torch.randn(1, 9, 7, op.d_inner)
    args = (op.x_proj_weight, op.dt_projs_weight, op.dt_projs_bias, op.A_logs, op.Ds)
    with torch.no_grad():
        ref = cross_selective_scan_fused(u, *args, low_memory=low_memory)
        with prec.autocast(torch.bfloat16, "cpu"):
            out = cross_selective_scan_fused(u, *args, low_memory=low_memory)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
