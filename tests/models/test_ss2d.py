"""SS2D and the cross-scan: the four scan orders, the streaming (linear-memory) path against the plain one,
the default choice of path, and the streaming path's memory bound."""

from __future__ import annotations

import pytest
import torch

from wsi_vssm.models import SS2D
from wsi_vssm.models.memory import ss2d_peak_memory
from wsi_vssm.ops.cross_scan import cross_merge, cross_scan, scan_positions


def explicit_orders(x: torch.Tensor) -> list[list[tuple[int, int]]]:
    """The (h, w) visited at each position of the four directions, written out by loops."""
    _, _, h, w = x.shape
    rows = [(i, j) for i in range(h) for j in range(w)]
    cols = [(i, j) for j in range(w) for i in range(h)]
    return [rows, cols, rows[::-1], cols[::-1]]


@pytest.mark.parametrize("hw", [(3, 5), (4, 1), (1, 6), (7, 7)])
def test_cross_scan_orders_and_merge(hw):
    x = torch.randn(2, 3, *hw)
    xs = cross_scan(x)  # (B, 4, D, L)
    orders = explicit_orders(x)
    for k, order in enumerate(orders):
        expected = torch.stack([x[:, :, i, j] for i, j in order], dim=-1)
        assert torch.equal(xs[:, k], expected)
        idx = scan_positions(k, *hw, 0, hw[0] * hw[1])
        assert idx.tolist() == [i * hw[1] + j for i, j in order]
    # merge: each pixel sums its four directions, read back where each visited it
    ys = torch.randn_like(xs)
    merged = torch.zeros_like(x)
    for k, order in enumerate(orders):
        for p, (i, j) in enumerate(order):
            merged[:, :, i, j] += ys[:, k, :, p]
    torch.testing.assert_close(cross_merge(ys, *hw), merged)
    # a chunk of positions is the slice of the full order
    assert scan_positions(3, *hw, 1, 3).tolist() == scan_positions(3, *hw, 0, hw[0] * hw[1])[1:3].tolist()


def perturbed_ss2d(d_model=12, d_state=2, ssm_ratio=2.0) -> SS2D:
    torch.manual_seed(0)
    m = SS2D(d_model, d_state=d_state, ssm_ratio=ssm_ratio, scan="reference", stream_chunk=10)
    with torch.no_grad():  # move away from init so that A, D and dt all matter
        m.A_logs.add_(0.5 * torch.randn_like(m.A_logs))
        m.Ds.add_(torch.randn_like(m.Ds))
        m.dt_projs_bias.add_(torch.randn_like(m.dt_projs_bias))
    return m.eval()


@pytest.mark.parametrize("hw", [(7, 5), (5, 11), (1, 9), (9, 1), (13, 13)])
@pytest.mark.parametrize("chunk", [1, 4, 17, 1000])
def test_streaming_equals_plain(hw, chunk):
    m = perturbed_ss2d()
    x = torch.randn(2, 12, *hw)
    with torch.no_grad():
        plain = m.forward_plain(x)
        streamed = m.forward_streaming(x, chunk=chunk)
    assert (streamed - plain).abs().max().item() < 1e-5


def test_default_path_streams_only_without_grad_on_large_maps(monkeypatch):
    m = perturbed_ss2d()
    m.stream_min_pixels = 30
    calls = []
    monkeypatch.setattr(m, "forward_streaming", lambda x: calls.append("stream") or m.forward_plain(x))
    x_large, x_small = torch.randn(1, 12, 6, 5), torch.randn(1, 12, 5, 5)
    with torch.no_grad():
        m(x_large)
        assert calls == ["stream"]
        m(x_small)
    m(x_large)  # autograd on: always the plain (differentiable) path
    assert calls == ["stream"]
    m.stream_min_pixels = None
    with torch.no_grad():
        m(x_large)
    assert calls == ["stream"]


def test_plain_path_gradients_flow():
    m = perturbed_ss2d()
    x = torch.randn(1, 12, 5, 7, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in m.parameters())


def test_streaming_memory_is_bounded_and_linear():
    """Peak extra memory of the streamed scan (beyond u and the merged map): chunk-sized, far under 4 maps."""
    kw = dict(d_model=8, chunk=32)
    small = ss2d_peak_memory(12, 20, path="scan_streaming", **kw)
    large = ss2d_peak_memory(24, 40, path="scan_streaming", **kw)
    plain = ss2d_peak_memory(12, 20, path="scan_plain", **kw)
    assert small.inner_maps <= 4 and large.inner_maps <= 4
    assert large.peak_extra_bytes <= 4 * small.peak_extra_bytes  # grows at most linearly with area
    assert plain.inner_maps > 10  # the plain path holds the four copies and the scan's inputs
    whole = ss2d_peak_memory(24, 40, path="streaming", **kw)  # + u and the merged map themselves
    assert whole.inner_maps <= 4
