"""Augmentation keeps shapes, dtypes and range, is seeded, and the HED round trip is exact without jitter."""

from __future__ import annotations

import torch

from wsi_vssm.training.data.augment import AugmentConfig, augment_batch, dihedral, hed_jitter


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)


def test_shapes_dtype_range():
    out = augment_batch(_batch(), AugmentConfig(blur_p=0.5), torch.Generator().manual_seed(1))
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_seeded():
    cfg = AugmentConfig(blur_p=0.5)
    a = augment_batch(_batch(), cfg, torch.Generator().manual_seed(3))
    b = augment_batch(_batch(), cfg, torch.Generator().manual_seed(3))
    c = augment_batch(_batch(), cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hed_identity_and_jitter():
    x = _batch().float().div(255).clamp_min(1 / 255)
    same = hed_jitter(x, 0.0, 0.0, torch.Generator())
    torch.testing.assert_close(same, x, atol=1e-4, rtol=1e-4)
    moved = hed_jitter(x, 0.1, 0.05, torch.Generator().manual_seed(0))
    assert 0 < (moved - x).abs().mean() < 0.2


def test_dihedral_is_a_permutation_of_pixels():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    y = dihedral(x, torch.Generator().manual_seed(0))
    assert torch.equal(y.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)


def test_off_is_identity():
    off = AugmentConfig(flip_rot=False, hed_scale=0, hed_shift=0, brightness=0, contrast=0, saturation=0, blur_p=0)
    x = _batch()
    torch.testing.assert_close(augment_batch(x, off, torch.Generator()), x.float() / 255, atol=1e-6, rtol=0)


def test_fp32_and_unchanged_under_a_bf16_training_autocast():
    cfg = AugmentConfig(blur_p=0.5)  # the blur's conv and the HED matmuls would otherwise round to bf16
    want = augment_batch(_batch(), cfg, torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = augment_batch(_batch(), cfg, torch.Generator().manual_seed(5))
    assert got.dtype == torch.float32 and torch.equal(got, want)
