"""bench/outputs_unchanged.py compares the paths it says it compares (no forward pass: quick)."""

from __future__ import annotations

import torch
from conftest import load_bench


def _bench():
    return load_bench("outputs_unchanged")


def test_old_path_is_the_reference_and_new_is_predicts_default():
    from wsi_vssm.models import SS2D

    bench = _bench()
    x = torch.zeros(1, 3, 64, 64)
    old, new = bench.load("old"), bench.load("new")
    assert not old.backbone.channels_last(x) and new.backbone.channels_last(x)
    assert {(m.scan, m.impl) for m in old.backbone.modules() if isinstance(m, SS2D)} == {("cpu", "reference")}
    assert all(m.use_fused(x) for m in new.backbone.modules() if isinstance(m, SS2D))
    assert all(p.exists() for p in bench.SAMPLES)


def test_forced_bf16_is_undone():
    from wsi_vssm.models import precision

    original = precision.bf16_supported
    with _bench().forced_bf16():
        assert precision.resolve_precision("bf16", "cpu") == torch.bfloat16
    assert precision.bf16_supported is original
