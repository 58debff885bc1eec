"""Every selective-scan implementation against the plain reference loop: output, last state, every gradient."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wsi_vssm.errors import MissingDependency
from wsi_vssm.ops import scan
from wsi_vssm.ops.scan import IMPLS, selective_scan, selective_scan_reference

CPU_IMPLS = ("cpu", "chunked")
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
# (rtol, atol) per input dtype, relative to the largest reference magnitude.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def make_inputs(batch, dim, length, nstate, groups, dtype=torch.float32, seed=0, full=True):
    """groups = 0: ungrouped B/C (batch, N, L); else (batch, G, N, L)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    bc = (batch, groups, nstate, length) if groups else (batch, nstate, length)
    x = {
        "u": rnd(batch, dim, length), "delta": rnd(batch, dim, length, scale=0.5),
        "A": -torch.rand(dim, nstate, generator=g) * 2 - 0.05, "B": rnd(*bc), "C": rnd(*bc),
    }
    if full:
        x.update(D=torch.randn(dim, generator=g), z=rnd(batch, dim, length),
                 delta_bias=torch.randn(dim, generator=g) * 0.1,
                 initial_state=torch.randn(batch, dim, nstate, generator=g))
    return x


def assert_close(actual, expected, tol, what):
    scale = expected.detach().float().abs().max().clamp_min(1.0)
    err = (actual.detach().float() - expected.detach().float()).abs().max()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} x {scale:.3g}"


def run_with_grads(impl, inputs, softplus=True):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y, h = selective_scan(**leaves, delta_softplus=softplus, return_last_state=True, impl=impl)
    g = torch.Generator().manual_seed(7)
    gy, gh = torch.randn(y.shape, generator=g).to(y.dtype), torch.randn(h.shape, generator=g)
    grads = torch.autograd.grad([y, h], list(leaves.values()), [gy, gh])
    return y, h, dict(zip(leaves, grads, strict=True))


SHAPES = [  # batch, D, L, N, groups
    (1, 3, 1, 1, 0),
    (2, 8, 37, 16, 2),
    (2, 4, 130, 1, 4),
    (1, 6, 129, 3, 0),
    (3, 4, 64, 1, 1),
    (2, 24, 300, 1, 2),  # cpu: a block of 8 interleaved channels (N = 1) plus a 4-channel remainder, 3 chunks
    (1, 16, 257, 1, 0),  # cpu: two full 8-channel blocks, ungrouped B/C
]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}d{}l{}n{}g{}".format(*s))
def test_matches_reference_fp32(impl, shape):
    x = make_inputs(*shape)
    y_ref, h_ref, g_ref = run_with_grads("reference", x)
    y, h, grads = run_with_grads(impl, x)
    assert y.dtype == torch.float32 and h.shape == h_ref.shape
    assert_close(y, y_ref, TOL[torch.float32], "y")
    assert_close(h, h_ref, TOL[torch.float32], "last state")
    for name in GRAD_NAMES:
        assert_close(grads[name], g_ref[name], 1e-4, f"d{name}")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_minimal_arguments_and_no_softplus(impl):
    x = make_inputs(2, 4, 50, 2, 0, full=False)
    assert_close(selective_scan(**x, impl=impl), selective_scan_reference(**x), 2e-5, "y")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_bf16_inputs(impl):
    x = make_inputs(2, 8, 40, 4, 2, dtype=torch.bfloat16)
    y_ref, h_ref, g_ref = run_with_grads("reference", x)
    y, h, grads = run_with_grads(impl, x)
    assert y.dtype == torch.bfloat16 and grads["u"].dtype == torch.bfloat16
    assert_close(y, y_ref, TOL[torch.bfloat16], "y")
    assert_close(h, h_ref, 1e-4, "last state")  # fp32 state from identical (bf16-rounded) inputs
    for name in ("u", "delta", "B"):
        assert_close(grads[name], g_ref[name], TOL[torch.bfloat16], f"d{name}")


@pytest.mark.parametrize("impl", ("reference", *CPU_IMPLS))
def test_state_carry_across_chunks(impl):
    x = make_inputs(2, 8, 101, 4, 2)
    full_y, full_h = selective_scan(**x, delta_softplus=True, return_last_state=True, impl=impl)
    s = 43
    first = {k: (v[..., :s] if v.dim() >= 3 and v.shape[-1] == 101 else v) for k, v in x.items()}
    second = {k: (v[..., s:] if v.dim() >= 3 and v.shape[-1] == 101 else v) for k, v in x.items()}
    y1, h1 = selective_scan(**first, delta_softplus=True, return_last_state=True, impl=impl)
    second["initial_state"] = h1
    y2, h2 = selective_scan(**second, delta_softplus=True, return_last_state=True, impl=impl)
    assert_close(torch.cat([y1, y2], -1), full_y, 2e-5, "chunked y")
    assert_close(h2, full_h, 2e-5, "chunked state")


def test_long_sequence_stable():
    x = make_inputs(1, 3, 200_000, 1, 0, full=False)
    x["delta"] = x["delta"] * 4  # strong decays: long products underflow, states must stay finite
    y_cpu, h_cpu = selective_scan(**x, delta_softplus=True, return_last_state=True, impl="cpu")
    y_chk, h_chk = selective_scan(**x, delta_softplus=True, return_last_state=True, impl="chunked")
    assert torch.isfinite(y_cpu).all() and torch.isfinite(h_cpu).all()
    assert_close(y_cpu, y_chk, 1e-4, "y")
    assert_close(h_cpu, h_chk, 1e-4, "state")


def test_long_sequence_interleaved_channels():
    """The 8-channel interleaved path (N = 1, 8 | channels per group) over many chunks, with z and D."""
    x = make_inputs(1, 16, 20_000, 1, 2)
    y_cpu, h_cpu = selective_scan(**x, delta_softplus=True, return_last_state=True, impl="cpu")
    y_chk, h_chk = selective_scan(**x, delta_softplus=True, return_last_state=True, impl="chunked")
    assert_close(y_cpu, y_chk, 1e-4, "y")
    assert_close(h_cpu, h_chk, 1e-4, "state")


CACHE_CHECK = """
import torch
from wsi_vssm.ops.scan import selective_scan
from wsi_vssm_kernels import scan_cpu
x = dict(u=torch.randn(1, 16, 50), delta=torch.randn(1, 16, 50), A=-torch.rand(16, 1),
         B=torch.randn(1, 2, 1, 50), C=torch.randn(1, 2, 1, 50))
for v in x.values():
    v.requires_grad_()
selective_scan(**x, delta_softplus=True, impl="cpu").sum().backward()
print("misses", sum(scan_cpu.scan_fwd.stats.cache_misses.values()) + sum(scan_cpu.scan_bwd.stats.cache_misses.values()))
"""


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"), reason="numba JIT disabled")
def test_cpu_kernels_load_from_numba_cache():
    """A second process must load the compiled kernels from numba's cache (cache=True), not recompile."""
    runs = [subprocess.run([sys.executable, "-c", CACHE_CHECK], capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    assert "misses 0" in runs[1].stdout, runs[1].stdout + runs[1].stderr


THREADS_CHECK = """
import torch
from wsi_vssm.ops.scan import selective_scan
from tests.ops.test_scan import make_inputs
before = torch.get_num_threads()
selective_scan(**make_inputs(1, 4, 16, 2, 0), delta_softplus=True, impl="cpu")
import numba
print("threads", before, torch.get_num_threads(), numba.threading_layer())
"""


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"), reason="numba JIT disabled")
def test_cpu_kernel_keeps_the_callers_torch_threads():
    """Starting numba's OpenMP pool raised torch's thread count to NUMBA_NUM_THREADS (1 -> 2): a library call
    must leave the caller's setting as it was."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", THREADS_CHECK], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.split()
    assert line[:3] == ["threads", "1", "1"], proc.stdout


def test_cpu_gradcheck_float64():
    x = {k: v.double() for k, v in make_inputs(2, 4, 9, 2, 2).items()}
    names = list(x)

    def f(*args):
        y, h = scan.selective_scan_cpu(**dict(zip(names, args, strict=True)), delta_softplus=True,
                                       return_last_state=True)
        return y, h

    args = [v.detach().clone().requires_grad_() for v in x.values()]
    # The kernel's exp and softplus are polynomials (kernels/scan_cpu.py): ~5e-9 relative, hence the tolerances.
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_unknown_impl_lists_valid_ones():
    x = make_inputs(1, 2, 3, 1, 0, full=False)
    with pytest.raises(ValueError, match="chunked"):
        selective_scan(**x, impl="fast")


def test_bad_shapes_raise_value_error():
    x = make_inputs(1, 6, 5, 2, 0, full=False)
    x["B"] = torch.randn(1, 4, 2, 5)  # 6 channels not divisible by 4 groups
    with pytest.raises(ValueError, match="divisible"):
        selective_scan(**x)


def test_auto_on_cpu_uses_numba_and_logs_once(caplog):
    scan._LOGGED.clear()
    x = make_inputs(1, 2, 3, 1, 0, full=False)
    with caplog.at_level(logging.INFO, logger="wsi_vssm.scan"):
        selective_scan(**x)
        selective_scan(**x)
    msgs = [r.getMessage() for r in caplog.records if r.name == "wsi_vssm.scan"]
    assert len(msgs) == 1 and "'cpu'" in msgs[0]


def test_auto_without_numba_raises_install_hint(monkeypatch):
    def missing():
        raise MissingDependency("numba (the fast CPU scan)", "pip install numba")

    monkeypatch.setattr(scan, "_numba_kernels", missing)
    x = make_inputs(1, 2, 3, 1, 0, full=False)
    with pytest.raises(MissingDependency, match="pip install numba"):
        selective_scan(**x)


def test_numba_missing_and_numba_broken_are_told_apart(monkeypatch):
    """A numba that is installed but fails to load (a numpy newer than it supports) was said to be "not
    installed; install it with: pip install numba", which pip answers with "already satisfied"."""
    import sys

    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "numba":
                raise ImportError("Numba needs NumPy 2.2 or less. Got NumPy 2.3.")
            return None

    monkeypatch.delitem(sys.modules, "numba", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(MissingDependency) as err:
        scan.numba_kernel_module("scan_cpu", "the fast CPU scan")
    assert str(err.value) == ("numba (the fast CPU scan) is installed but fails to load (Numba needs NumPy 2.2 or "
                              "less. Got NumPy 2.3.); repair it with: pip install --upgrade numba")
    monkeypatch.setitem(sys.modules, "numba", None)  # not installed
    with pytest.raises(MissingDependency, match=r"^numba \(the fast CPU scan\) is not installed; install it with: "
                                                r"pip install numba$"):
        scan.numba_kernel_module("scan_cpu", "the fast CPU scan")


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is not None, reason="mamba-ssm installed")
def test_mamba_ssm_missing_says_how_to_install():
    x = make_inputs(1, 2, 3, 1, 0, full=False)
    with pytest.raises(MissingDependency, match=r'pip install "wsi-vssm\[cuda\]"'):
        selective_scan(**x, impl="mamba_ssm")


def test_mamba_ssm_rejects_initial_state():
    x = make_inputs(1, 2, 3, 1, 0)
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(**x, impl="mamba_ssm")


def test_impls_listed():
    assert set(IMPLS) == {"auto", "reference", "cpu", "chunked", "mamba_ssm", "triton"}


class _ScanModule(torch.nn.Module):
    def forward(self, u, delta, A, B, C, D, z):
        return selective_scan(u, delta, A, B, C, D, z, delta_softplus=True, impl="chunked")


def test_chunked_exports_to_onnx(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    x = make_inputs(1, 8, 70, 2, 2, full=False)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], torch.randn(8), torch.randn(1, 8, 70))
    path = tmp_path / "scan.onnx"
    torch.onnx.export(_ScanModule(), args, str(path), opset_version=17, dynamo=False,
                      input_names=["u", "delta", "A", "B", "C", "D", "z"], output_names=["y"])
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = {n: a.numpy() for n, a in zip(["u", "delta", "A", "B", "C", "D", "z"], args, strict=True) if n in names}
    (y_onnx,) = sess.run(None, feeds)
    assert_close(torch.from_numpy(y_onnx), selective_scan_reference(*args, delta_softplus=True), 1e-4, "onnx y")


TRITON_CHECK = """
import torch, sys
sys.path.insert(0, {tests!r})
from test_scan import assert_close, make_inputs, run_with_grads
# the fused backward: one tile (1 x 1, odd D), several tiles (N = 1: 128-step tiles; N = 16: 16-step tiles, a
# masked tail), groups whose width is not the program's 4 channels, with and without z, D, bias, initial state
for shape, full, softplus in [((1, 3, 1, 1, 0), True, True), ((2, 8, 13, 4, 2), True, True),
                              ((1, 40, 9, 1, 4), False, True), ((2, 6, 150, 1, 3), True, False),
                              ((1, 5, 40, 16, 0), True, True), ((2, 8, 37, 16, 2), False, True)]:
    x = make_inputs(*shape, full=full)
    y_ref, h_ref, g_ref = run_with_grads("reference", x, softplus=softplus)
    y, h, grads = run_with_grads("triton", x, softplus=softplus)
    assert_close(y, y_ref, 2e-5, f"y {{shape}}")
    assert_close(h, h_ref, 2e-5, f"last state {{shape}}")
    for name in g_ref:
        assert_close(grads[name], g_ref[name], 1e-4, f"d{{name}} {{shape}}")
# only y used: the last state's gradient arrives as None
from wsi_vssm.ops.scan import selective_scan
x = make_inputs(1, 4, 20, 2, 0)


def y_only_grads(impl):
    leaves = {{k: v.clone().requires_grad_() for k, v in x.items()}}
    y = selective_scan(**leaves, delta_softplus=True, impl=impl)
    return dict(zip(leaves, torch.autograd.grad(y.sum(), list(leaves.values()))))


got, ref = y_only_grads("triton"), y_only_grads("reference")
for name in ref:
    assert_close(got[name], ref[name], 1e-4, f"y-only d{{name}}")
# both kernels directly, with tiles shorter than L (the carry across tiles, a masked tail) and N > 1
from wsi_vssm.ops.scan import _as_groups, selective_scan_reference
from wsi_vssm_kernels import scan_triton
for shape in [(1, 40, 37, 1, 4), (2, 6, 50, 3, 3), (1, 5, 16, 16, 0)]:
    x = make_inputs(*shape)
    y_ref, h_ref = selective_scan_reference(**x, delta_softplus=True, return_last_state=True)
    for variant, block_l in [("serial", None), ("tiled", 16), ("tiled", None)]:
        y, h = scan_triton.scan_fwd(x["u"], x["delta"], x["A"], _as_groups(x["B"]).contiguous(),
                                    _as_groups(x["C"]).contiguous(), x["D"], x["z"], x["delta_bias"],
                                    x["initial_state"], True, variant=variant, block_l=block_l)
        assert_close(y, y_ref, 2e-5, f"{{variant}} y {{shape}}")
        assert_close(h, h_ref, 2e-5, f"{{variant}} last state {{shape}}")
# the training pair at a tuning config (bench/gpu.py's scan_tune) gives the default config's gradients; a
# backward told another tile length than the forward saved states for is refused
x = make_inputs(2, 8, 45, 2, 2)
args = (x["u"], x["delta"], x["A"], _as_groups(x["B"]).contiguous(), _as_groups(x["C"]).contiguous(), x["D"],
        x["z"], x["delta_bias"], x["initial_state"], True)
dy = torch.randn_like(x["u"])
pairs = {{}}
for kw in ({{}}, {{"block_d": 2, "block_l": 16, "num_warps": 2}}):
    _, hlast, hck = scan_triton.scan_fwd(*args, save_states=True, **kw)
    pairs[len(kw)] = scan_triton.scan_bwd(*args[:8], hck, dy, torch.ones_like(hlast), True, **kw)
for got, ref in zip(pairs[3], pairs[0], strict=True):
    assert_close(got, ref, 1e-5, "tuned config's gradients")
try:
    scan_triton.scan_bwd(*args[:8], hck, dy, torch.ones_like(hlast), True, block_l=32)
    raise SystemExit("a backward with the wrong tile length ran")
except ValueError as e:
    assert "16 steps" not in str(e) and "32 steps" in str(e), e
print("ok")
"""


@pytest.mark.triton
def test_triton_interpreter_matches_reference():
    """In a fresh interpreter: TRITON_INTERPRET must be set before triton is first imported (triton's own
    helpers such as tl.sum are jitted at import), which this process cannot guarantee."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = TRITON_CHECK.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def test_cuda_choice_is_made_once(monkeypatch):
    calls = []

    def missing():
        calls.append(1)
        raise MissingDependency("mamba-ssm (the CUDA scan)", "pip install mamba-ssm")

    monkeypatch.setattr(scan, "_import_mamba_ssm", missing)
    scan._cuda_impl.cache_clear()
    try:
        first = scan._auto_cuda(None)
        assert scan._auto_cuda(None) == first and first in ("triton", "chunked")
        assert len(calls) == 1
    finally:
        scan._cuda_impl.cache_clear()
