"""The slide head's pools (wsi_vssm.models.mil): attention, top-k, their mix, count; calibration folded in, with
its bag-size term."""

from __future__ import annotations

import math

import pytest
import torch

from wsi_vssm.models.mil import (
    AttentionMIL,
    MILConfig,
    MILEnsemble,
    count_stats,
    make_mil,
    single_head_state,
    topk_mean,
)


def test_topk_mean_ignores_padding_and_short_bags():
    logits = torch.tensor([[5.0, 1.0, 3.0, 9.0], [2.0, 4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    assert torch.allclose(topk_mean(logits, mask, 2), torch.tensor([4.0, 3.0]))  # 9 is padding
    assert torch.allclose(topk_mean(logits, mask, 3), torch.tensor([3.0, 3.0]))  # bag 2 has only two cells
    assert torch.allclose(topk_mean(logits, None, 1), torch.tensor([9.0, 4.0]))


def test_count_stats_count_real_cells_at_or_above_the_threshold():
    logits = torch.tensor([[5.0, 1.0, 3.0, 9.0], [2.0, 4.0, 0.0, 0.0], [-1.0, -2.0, -3.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [False, False, False, False]])
    hits, cells = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([3.0, 2.0, 1.0])  # an empty bag counts as one cell
    assert torch.allclose(count_stats(logits, mask, 3.0), torch.stack([hits.log1p(), cells.log()], -1))
    # without a mask every cell is real: row 0 has 5, 3 and 9 at or above 3, of 4 cells
    assert torch.allclose(count_stats(logits, None, 3.0)[0], torch.tensor([math.log1p(3), math.log(4)]))


def test_count_head_reads_the_count_and_the_bag_size_only():
    torch.manual_seed(0)
    mil = AttentionMIL(MILConfig(16, 8, 4, 0.0, "count", count_threshold=0.5)).eval()
    with torch.no_grad():
        mil.count_affine.weight.copy_(torch.tensor([[2.0, -1.0]]))
        mil.count_affine.bias.fill_(0.25)
    feats = torch.randn(1, 30, 16)
    out = mil(feats)
    hits = int((out.cell_logits >= 0.5).sum())
    assert out.slide_logit.item() == pytest.approx(2.0 * math.log1p(hits) - math.log(30) + 0.25, abs=1e-5)
    assert "topk_affine.weight" not in mil.state_dict() and "count_affine.weight" in mil.state_dict()


@pytest.mark.parametrize("pool", ["attention", "topk", "mix", "count"])
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


@pytest.mark.parametrize("pool", ["attention", "mix", "count"])
def test_size_term_adds_its_slope_times_log_real_cells(pool):
    torch.manual_seed(0)
    mil = AttentionMIL(MILConfig(16, 8, 4, 0.0, pool, 3)).eval()
    feats = torch.randn(2, 40, 16)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, :40] = True
    mask[1, :9] = True  # the second bag has 9 real cells and 31 of padding
    before = mil(feats, mask).slide_logit
    mil.calibrate(0.5, -1.25, 0.75)
    assert mil.config.size_slope == pytest.approx(0.75)
    expected = 0.5 * before - 1.25 + 0.75 * torch.log(torch.tensor([40.0, 9.0]))
    assert torch.allclose(mil(feats, mask).slide_logit, expected, atol=1e-5)
    # a second calibration scales the size term with the rest and adds its own
    mil.calibrate(2.0, 0.5, -0.25)
    assert mil.config.size_slope == pytest.approx(2.0 * 0.75 - 0.25)
    expected = 2.0 * expected + 0.5 - 0.25 * torch.log(torch.tensor([40.0, 9.0]))
    assert torch.allclose(mil(feats, mask).slide_logit, expected, atol=1e-4)


def test_files_without_a_size_term_have_none():
    cfg = MILConfig(**{"in_dim": 16, "hidden_dim": 8, "attn_dim": 4, "dropout": 0.25, "pool": "mix"})
    assert cfg.size_slope == 0.0
    mil = AttentionMIL(cfg).eval()
    feats = torch.randn(1, 12, 16)
    out = mil(feats).slide_logit
    mil.config.size_slope = 1.0
    assert torch.allclose(mil(feats).slide_logit, out + math.log(12), atol=1e-5)


def test_files_without_a_pool_are_attention_and_bad_pools_are_refused():
    cfg = MILConfig(**{"in_dim": 16, "hidden_dim": 8, "attn_dim": 4, "dropout": 0.25})  # an older file's keys
    assert cfg.pool == "attention" and "topk_affine.weight" not in AttentionMIL(cfg).state_dict()
    with pytest.raises(ValueError, match="pool"):
        MILConfig(16, pool="max")


def _heads(pool: str, n: int) -> list[AttentionMIL]:
    heads = [AttentionMIL(MILConfig(16, 8, 4, 0.0, pool, topk=3)).eval() for _ in range(n)]
    for h in heads[1:]:  # trained members share the model's cell head
        h.cell_head.load_state_dict(heads[0].cell_head.state_dict())
    return heads


@pytest.mark.parametrize("pool", ["attention", "mix", "count"])
def test_an_ensemble_is_the_mean_of_its_members_and_calibrates_as_one(pool):
    torch.manual_seed(0)
    heads = _heads(pool, 3)
    ens = MILEnsemble.of(heads).eval()
    feats, mask = torch.randn(2, 20, 16), torch.ones(2, 20, dtype=torch.bool)
    mask[1, 15:] = False
    with torch.no_grad():
        outs = [h(feats, mask) for h in heads]
        got = ens(feats, mask)
        mean = torch.stack([o.slide_logit for o in outs]).mean(0)
        assert torch.allclose(got.slide_logit, mean, atol=1e-6)
        assert torch.allclose(got.attention, torch.stack([o.attention for o in outs]).mean(0), atol=1e-6)
        assert torch.equal(got.cell_logits, outs[0].cell_logits)
        ens.calibrate(1.5, -0.25, 0.4)  # the mean becomes a * mean + b + c * log(real cells)
        want = 1.5 * mean - 0.25 + 0.4 * torch.tensor([math.log(20), math.log(15)])
        assert torch.allclose(ens(feats, mask).slide_logit, want, atol=1e-5)
        assert ens.config.size_slope == pytest.approx(0.4) and all(m.config.size_slope == 0 for m in ens.members)


def test_an_ensemble_holds_one_cell_head_and_its_members_configs_agree():
    heads = _heads("mix", 2)
    ens = MILEnsemble.of(heads)
    assert sorted(k for k in ens.state_dict() if "cell_head" in k) == ["cell_head.bias", "cell_head.weight"]
    assert ens.config.members == 2 and make_mil(ens.config).state_dict().keys() == ens.state_dict().keys()
    assert type(make_mil(MILConfig(16))) is AttentionMIL
    # a start for a new single head: the first member with the shared cell head
    AttentionMIL(heads[0].config).load_state_dict(single_head_state(ens), strict=True)
    with pytest.raises(ValueError, match="one configuration"):
        MILEnsemble.of([heads[0], AttentionMIL(MILConfig(16, 8, 4, 0.0, "mix", topk=5))])
    other = AttentionMIL(heads[0].config)  # a cell head of its own: its cell logits are not the ensemble's
    with pytest.raises(ValueError, match="share one cell head"):
        MILEnsemble.of([heads[0], other])
    heads[1].calibrate(2.0, 0.0, 1.0)  # a calibrated head has a size term of its own: not a member
    with pytest.raises(ValueError, match="uncalibrated"):
        MILEnsemble.of(heads)


@pytest.mark.parametrize("members", [0, 1.5, True, 65])
def test_bad_member_counts_are_refused(members):
    with pytest.raises(ValueError, match="members"):
        MILConfig(16, members=members)
    assert MILConfig(**{"in_dim": 16}).members == 1  # files made before ensembles: one head
    # and a single head's file says nothing of members, so versions before ensembles read it
    assert "members" not in MILConfig(16).to_dict() and MILConfig(16, members=2).to_dict()["members"] == 2
