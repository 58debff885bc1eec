"""Precision choice: fp32 / bf16 / auto, the fallback when the CPU has no native bf16, and a bf16 forward."""

from __future__ import annotations

import warnings

import pytest
import torch

from wsi_vssm.errors import UsageError
from wsi_vssm.models import create_model
from wsi_vssm.models import precision as prec


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
