"""The fused CPU SS2D kernel pair against today's path (its same-signature reference): outputs and every
gradient on odd shapes, the low-memory variant, the model-level default, and the missing-numba error."""

from __future__ import annotations

import pytest
import torch

from wsi_vssm.errors import MissingDependency
from wsi_vssm.ops import ss2d_fused
from wsi_vssm.ops.ss2d_fused import (
    cross_selective_scan,
    cross_selective_scan_fused,
    cross_selective_scan_reference,
)

NAMES = ("u", "x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")


def make_inputs(batch, h, w, dim, rank, nstate, seed=0):
    """Parameters moved away from init so that A, D and dt all matter."""
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, h, w, dim, generator=g),
        "x_proj_weight": torch.randn(4, rank + 2 * nstate, dim, generator=g) * dim**-0.5,
        "dt_projs_weight": torch.randn(4, dim, rank, generator=g) * rank**-0.5,
        "dt_projs_bias": torch.randn(4, dim, generator=g) * 0.5 - 2.0,
        "A_logs": torch.log(torch.rand(4 * dim, nstate, generator=g) + 0.5),
        "Ds": torch.randn(4 * dim, generator=g),
    }


def run(fn, inputs, **kw):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = fn(**leaves, **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(y, list(leaves.values()), gy)
    return y.detach(), dict(zip(leaves, grads, strict=True))


def assert_close(actual, expected, what, tol=2e-5):
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual - expected).abs().max()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} x {scale:.3g}"


SHAPES = [  # batch, H, W, D, R, N: 1x1, 1xN, Nx1, non-square, L at and around the 64-position chunk
    (1, 1, 1, 8, 2, 1),
    (2, 1, 9, 12, 2, 1),
    (1, 11, 1, 16, 3, 2),
    (2, 5, 7, 24, 2, 1),
    (1, 8, 8, 70, 3, 1),  # L = 64: exactly one chunk; D = 70: a short channel block
    (1, 5, 13, 16, 2, 2),  # L = 65: one position into the second chunk
    (2, 3, 43, 40, 4, 1),  # L = 129, long rows
    (1, 43, 3, 33, 2, 1),  # L = 129, long columns
]


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_matches_reference_outputs_and_gradients(shape):
    x = make_inputs(*shape)
    # the plain loop for short maps; the numba 1D scan (itself tested against the loop) for longer ones
    y_ref, g_ref = run(cross_selective_scan_reference, x, scan="reference" if shape[1] * shape[2] < 64 else "cpu")
    y, g = run(cross_selective_scan_fused, x)
    assert y.shape == y_ref.shape
    assert_close(y, y_ref, "y")
    for name in NAMES:
        assert_close(g[name], g_ref[name], "d " + name, tol=5e-5)


@pytest.mark.parametrize("shape", [(1, 9, 15, 24, 2, 1), (2, 4, 1, 12, 3, 2)])
def test_low_memory_and_all_directions_give_the_same_output(shape):
    x = make_inputs(*shape)
    with torch.no_grad():
        ref = cross_selective_scan_reference(**x, scan="cpu")
        full = cross_selective_scan_fused(**x)
        low = cross_selective_scan_fused(**x, low_memory=True)
    assert_close(full, ref, "all directions in one call")
    assert_close(low, full, "one direction at a time", tol=1e-6)


def test_dispatch_and_errors(monkeypatch):
    x = make_inputs(1, 3, 4, 8, 2, 1)
    with torch.no_grad():
        assert_close(cross_selective_scan(**x, impl="auto"), cross_selective_scan(**x, impl="reference"), "auto")
    with pytest.raises(ValueError, match="valid: auto, reference, fused"):
        cross_selective_scan(**x, impl="fast")

    def missing():
        raise MissingDependency("numba (the fused CPU SS2D)", "pip install numba")

    monkeypatch.setattr(ss2d_fused, "_fused_kernels", missing)
    with pytest.raises(MissingDependency, match="pip install numba"):
        cross_selective_scan_fused(**x)


def test_block_width_gives_every_thread_work_in_wide_blocks():
    assert ss2d_fused.block_width(1, 64, 2) == 32  # one half of every pixel per thread
    assert ss2d_fused.block_width(64, 64, 2) == 64  # whole pixels: contiguous reads
    assert ss2d_fused.block_width(1, 8, 4) == 8
    assert ss2d_fused.block_width(1, 1536, 2) == 384  # capped: 4 blocks, still a multiple of the threads
    assert ss2d_fused.block_width(3, 40, 2) == 40


def test_every_gradient_has_its_parameters_strides():
    """DDP's buckets take each parameter's strides; a gradient in other strides is copied, with a warning
    ("Grad strides do not match bucket view strides"). For d_state 1 the fused backward returned A_logs' gradient
    as a (K*D, 1) view with strides (1, D)."""
    from wsi_vssm.models.registry import create_model

    model = create_model("micro", num_classes=0)
    model.forward_features(torch.randn(2, 3, 64, 64)).sum().backward()
    alogs = [(n, p) for n, p in model.named_parameters() if n.endswith("A_logs")]
    assert alogs
    for name, p in alogs:
        assert p.grad.stride() == p.stride(), (name, p.stride(), p.grad.stride())
