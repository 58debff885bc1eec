"""The fused CPU path as the model's default: same features and every gradient as today's path, the golden
upstream output, streaming inference, and the choice of path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wsi_vssm.models import ModelConfigError, create_model
from wsi_vssm.models.ss2d import SS2D

GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "vssm_micro_golden.pt"


def pair(**kw):
    """The default model and the same weights on today's path (numba scan, channel-first)."""
    torch.manual_seed(0)
    new = create_model("micro", num_classes=0, **kw)
    old = create_model("micro", num_classes=0, scan="cpu", ss2d_impl="reference", **kw)
    old.load_state_dict(new.state_dict())
    return new, old


def test_default_model_takes_the_fused_path_on_cpu_fp32():
    new, old = pair()
    x = torch.randn(1, 3, 8, 8)
    assert new.channels_last(x) and all(m.use_fused(x) for m in new.modules() if isinstance(m, SS2D))
    assert not old.channels_last(x)
    assert not create_model("micro", scan="reference").channels_last(x)  # an explicit scan keeps today's path
    with pytest.raises(ModelConfigError, match="valid: auto, reference, fused"):
        create_model("micro", ss2d_impl="fast")


@pytest.mark.parametrize("hw", [(1, 1), (33, 71), (67, 5), (96, 96)])
def test_forward_features_equal_today(hw):
    new, old = pair()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        a, b = new.eval().forward_features(x), old.eval().forward_features(x)
    assert a.shape == b.shape and a.is_contiguous()
    assert (a - b).abs().max().item() < 1e-4


def test_training_step_gradients_equal_today():
    new, old = pair(drop_path=0.1)
    x = torch.randn(3, 3, 45, 38)
    grads = []
    for model in (new, old):
        leaf = x.clone().requires_grad_()
        torch.manual_seed(1)  # same drop-path draws
        model.train().forward_features(leaf).square().mean().backward()
        grads.append({"input": leaf.grad, **{k: p.grad for k, p in model.named_parameters()}})
    for k, ref in grads[1].items():
        got = grads[0][k]
        err = (got - ref).abs().max() / ref.abs().max().clamp_min(1e-8)
        assert err < 1e-4, f"{k}: relative error {err:.3g}"


def test_streaming_inference_equals_plain():
    new, _ = pair(stream_min_pixels=1, stream_chunk=23)
    x = torch.randn(1, 3, 45, 66)
    with torch.no_grad():
        streamed = new.eval().forward_features(x)
    with torch.enable_grad():
        plain = new.forward_features(x)
    assert (streamed - plain).abs().max().item() < 1e-5


@pytest.mark.parametrize("batch", [1, 2])  # batch 1: out_proj writes each band in place; 2: a copy per band
def test_streaming_inference_equals_plain_for_batches(batch):
    new, _ = pair(stream_min_pixels=1, stream_chunk=40)
    x = torch.randn(batch, 3, 37, 90)
    with torch.no_grad():
        streamed = new.eval().forward_features(x)
        for m in new.modules():  # the same model without streaming
            if isinstance(m, SS2D):
                m.stream_min_pixels = None
        plain = new.forward_features(x)
    assert (streamed - plain).abs().max().item() < 1e-5


def test_streaming_under_bf16_autocast_agrees_with_fp32():
    new, _ = pair(stream_min_pixels=1, stream_chunk=40)
    x = torch.randn(1, 3, 37, 90)
    with torch.no_grad():
        ref = new.eval().forward_features(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = new.forward_features(x)
    assert low.shape == ref.shape
    assert (low.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_golden_upstream_output_on_the_fused_path():
    if not GOLDEN.exists():
        pytest.skip(f"shared reference file not present: {GOLDEN}")
    from wsi_vssm.models import VSSM, VSSMConfig

    g = torch.load(GOLDEN, weights_only=True)
    c = g["config"]
    cfg = VSSMConfig(dims=c["dims"], depths=tuple(c["depths"]), ssm_ratio=c["ssm_ratio"], d_state=c["ssm_d_state"],
                     dt_rank=c["ssm_dt_rank"], mlp_ratio=c["mlp_ratio"], num_classes=c["num_classes"])
    model = VSSM(cfg).eval()
    model.load_state_dict(g["state_dict"], strict=True)
    assert model.channels_last(g["input"])
    with torch.no_grad():
        out = model(g["input"])
    assert (out - g["output"]).abs().max().item() < 1e-4
