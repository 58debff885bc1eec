"""The slide head's pools (wsi_vssm.models.mil): attention, top-k and their mix; calibration folded in."""

from __future__ import annotations

import pytest
import torch

from wsi_vssm.models.mil import AttentionMIL, MILConfig, topk_mean


def test_topk_mean_ignores_padding_and_short_bags():
    logits = torch.tensor([[5.0, 1.0, 3.0, 9.0], [2.0, 4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    assert torch.allclose(topk_mean(logits, mask, 2), torch.tensor([4.0, 3.0]))  # 9 is padding
    assert torch.allclose(topk_mean(logits, mask, 3), torch.tensor([3.0, 3.0]))  # bag 2 has only two cells
    assert torch.allclose(topk_mean(logits, None, 1), torch.tensor([9.0, 4.0]))


@pytest.mark.parametrize("pool", ["attention", "topk", "mix"])
def test_calibrate_folds_platt_scaling_into_the_slide_logit(pool):
    torch.manual_seed(0)
    mil = AttentionMIL(MILConfig(16, 8, 4, 0.0, pool, 3)).eval()
    feats = torch.randn(2, 20, 16)
    before = mil(feats).slide_logit
    mil.calibrate(0.5, -1.25)
    out = mil(feats)
    assert torch.allclose(out.slide_logit, 0.5 * before - 1.25, atol=1e-5)
    if pool == "topk":  # the top-k head reads the cell logits only
        assert torch.allclose(out.slide_logit, 0.5 * topk_mean(out.cell_logits, None, 3) - 1.25, atol=1e-5)


def test_files_without_a_pool_are_attention_and_bad_pools_are_refused():
    cfg = MILConfig(**{"in_dim": 16, "hidden_dim": 8, "attn_dim": 4, "dropout": 0.25})  # an older file's keys
    assert cfg.pool == "attention" and "topk_affine.weight" not in AttentionMIL(cfg).state_dict()
    with pytest.raises(ValueError, match="pool"):
        MILConfig(16, pool="max")
