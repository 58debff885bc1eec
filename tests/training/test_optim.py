"""The trainers' shared AdamW: its decay groups, torch's fused kernel on CPU, and resuming older checkpoints."""

import torch

from wsi_vssm.models import create_model
from wsi_vssm.training.optim import adamw


def _step(model, opt, seed):
    torch.manual_seed(seed)
    opt.zero_grad(set_to_none=True)
    model(torch.rand(2, 3, 32, 32)).float().pow(2).mean().backward()
    opt.step()


def test_decay_groups_and_fused_on_cpu():
    model = create_model("micro", num_classes=2)
    opt = adamw(model, lr=1e-3, weight_decay=0.05)
    decay, no_decay = opt.param_groups
    assert opt.defaults["fused"] is True
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_fused_matches_the_unfused_update():
    torch.manual_seed(0)
    a = create_model("micro", num_classes=2)
    b = create_model("micro", num_classes=2)
    b.load_state_dict(a.state_dict())
    fused = adamw(a, lr=1e-3, weight_decay=0.05)
    plain = torch.optim.AdamW([{"params": [p for p in b.parameters() if p.ndim >= 2], "weight_decay": 0.05},
                               {"params": [p for p in b.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                              lr=1e-3)
    for seed in range(3):
        _step(a, fused, seed)
        _step(b, plain, seed)
    # three steps of lr 1e-3 move a weight by up to 3e-3; the fused kernel orders the arithmetic otherwise, and
    # where a gradient is near 0, m / (sqrt(v) + eps) magnifies the rounding: on an AVX2 EPYC host (2026-12-06)
    # one weight of 262,144 differed by 1.3e-6 (0.04% of its step), so 5e-6 is the bound, not 1e-6
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=5e-6)


def test_resumes_from_an_unfused_checkpoint():
    """Checkpoints written before the trainers fused AdamW hold the plain optimiser's state."""
    torch.manual_seed(0)
    model = create_model("micro", num_classes=2)
    plain = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.05},
                               {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                              lr=1e-3)
    _step(model, plain, 0)
    resumed = adamw(model, lr=1e-3, weight_decay=0.05)
    resumed.load_state_dict(plain.state_dict())
    _step(model, resumed, 1)
    assert all(float(s["step"]) == 2.0 for s in resumed.state.values())
