"""VSSM backbone: upstream parameter names/shapes, the golden upstream output, shapes, config errors,
gradient checkpointing, streaming inference."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from wsi_vssm.errors import WsiVssmError
from wsi_vssm.models import VSSM, ModelConfigError, VSSMConfig, create_model, list_models
from wsi_vssm.models import ss2d as ss2d_module
from wsi_vssm.ops import cross_scan as cs

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference"
UPSTREAM_KEYS = {
    "tiny": "keys_vmamba_tiny_s2l5.txt",
    "small": "keys_vmamba_small_s2l15.txt",
    "base": "keys_vmamba_base_s2l15.txt",
    "tiny_s1": "keys_vmamba_tiny_s1l8.txt",
    "small_s1": "keys_vmamba_small_s1l20.txt",
    "base_s1": "keys_vmamba_base_s1l20.txt",
}


def reference_file(name: str) -> Path:
    p = REFERENCE / name
    if not p.exists():
        pytest.skip(f"shared reference file not present: {p}")
    return p


def read_keys(path: Path) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """(name, shape) rows of a keys file, and the value count its header states."""
    rows, header = [], path.read_text().splitlines()[0]
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            rows.append((name, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    values = int(header.split(" tensors, ")[1].split()[0])
    return rows, values


@pytest.mark.parametrize("name", list(UPSTREAM_KEYS))
def test_state_dict_matches_upstream_keys(name):
    expected, n_values = read_keys(reference_file(f"keys/{UPSTREAM_KEYS[name]}"))
    with torch.device("meta"):
        model = create_model(name)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected  # same names, shapes and order
    assert sum(math.prod(s) for _, s in got) == n_values


def golden():
    return torch.load(reference_file("vssm_micro_golden.pt"), weights_only=True)


def golden_model(g) -> VSSM:
    c = g["config"]
    cfg = VSSMConfig(
        dims=c["dims"], depths=tuple(c["depths"]), ssm_ratio=c["ssm_ratio"], d_state=c["ssm_d_state"],
        dt_rank=c["ssm_dt_rank"], mlp_ratio=c["mlp_ratio"], num_classes=c["num_classes"], scan="reference",
    )
    model = VSSM(cfg).eval()
    model.load_state_dict(g["state_dict"], strict=True)
    return model


def run_with_intermediates(model: VSSM, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits and the golden file's intermediates, named as upstream ('layers.i' = after its downsample)."""
    acts, hooks = {}, []

    def keep(name):
        def hook(mod, args, out):
            acts[name] = out
            if name.endswith(".op"):
                acts[name + ".in"], acts[name + ".out"] = args[0], out
        return hook

    targets = {"patch_embed": "patch_embed", "layers.0.blocks.0.op": "layers.0.blocks.0.op"}
    for i in range(4):
        targets[f"layers.{i}.blocks"] = f"layers.{i}.blocks"
        targets[f"layers.{i}.downsample"] = f"layers.{i}"
    modules = dict(model.named_modules())
    hooks = [modules[m].register_forward_hook(keep(n)) for m, n in targets.items()]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, acts


def test_golden_output_and_intermediates():
    g = golden()
    out, acts = run_with_intermediates(golden_model(g), g["input"])
    assert out.shape == g["output"].shape
    assert (out - g["output"]).abs().max().item() < 1e-5
    for name, ref in g["intermediates"].items():
        assert acts[name].shape == ref.shape, name
        assert (acts[name] - ref).abs().max().item() < 1e-5, name


def test_golden_streaming_path_agrees():
    g = golden()
    model = golden_model(g)
    for block in model.modules():
        if isinstance(block, ss2d_module.SS2D):
            block.stream_min_pixels, block.stream_chunk = 1, 37  # stream everything, chunks not dividing L
    with torch.no_grad():
        out = model(g["input"])
    assert (out - g["output"]).abs().max().item() < 1e-5


def test_golden_check_catches_swapped_scan_directions(monkeypatch):
    """The golden comparison must fail when two scan orders trade places (the parameters of k=0 see k=1)."""
    g = golden()
    swap = [1, 0, 2, 3]
    monkeypatch.setattr(ss2d_module, "cross_scan", lambda x: cs.cross_scan(x)[:, swap])
    monkeypatch.setattr(ss2d_module, "cross_merge", lambda ys, h, w: cs.cross_merge(ys[:, swap], h, w))
    out, _ = run_with_intermediates(golden_model(g), g["input"])
    assert (out - g["output"]).abs().max().item() > 1e-3


def micro(**kw) -> VSSM:
    torch.manual_seed(0)
    return create_model("micro", scan="reference", **kw)


@pytest.mark.parametrize("hw", [(33, 71), (64, 31), (1, 1), (67, 5)])
def test_any_input_size_gives_ceil_shapes(hw):
    model = micro(num_classes=3).eval()
    h, w = hw
    with torch.no_grad():
        stages = model.forward_stages(torch.randn(2, 3, h, w))
        logits = model.forward_head(stages[-1])
    for i, f in enumerate(stages):
        hh, ww = h, w
        for _ in range(i + 2):
            hh, ww = -(-hh // 2), -(-ww // 2)
        assert f.shape == (2, 32 * 2**i, hh, ww)
    assert logits.shape == (2, 3)


def test_num_classes_zero_has_no_classifier_and_returns_pooled_features():
    model = micro()  # micro is features-only
    assert not [k for k in model.state_dict() if k.startswith("classifier")]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 40, 40))
    assert out.shape == (1, model.num_features)


def test_registry_errors_list_choices():
    with pytest.raises(ModelConfigError, match="micro.*tiny.*base_s1"):
        create_model("huge")
    with pytest.raises(WsiVssmError, match="reference"):
        create_model("micro", scan="fast")
    with pytest.raises(ModelConfigError, match="valid:.*depths"):
        create_model("micro", dpeths=(1, 1, 1, 1))
    with pytest.raises(ModelConfigError, match="depths"):
        VSSMConfig(depths=(1, 2, 3))
    with pytest.raises(ModelConfigError, match="dims"):
        VSSMConfig(dims=(16, 32))
    assert set(list_models()) == {"micro", "micro_wide", *UPSTREAM_KEYS}


def test_initialisation_follows_spec():
    model = micro()
    op = model.layers[0].blocks[0].op
    n = torch.arange(1, op.d_state + 1, dtype=torch.float32)
    assert torch.allclose(op.A_logs, torch.log(n).expand_as(op.A_logs))
    assert torch.equal(op.Ds, torch.ones_like(op.Ds))
    dt = torch.nn.functional.softplus(op.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert op.x_proj_weight.abs().max() <= op.d_inner**-0.5
    assert op.dt_projs_weight.abs().max() <= op.dt_rank**-0.5
    fc1 = model.layers[0].blocks[0].mlp.fc1
    assert abs(fc1.weight.std().item() - 0.02) < 0.002 and torch.equal(fc1.bias, torch.zeros_like(fc1.bias))


def test_grad_checkpointing_gives_equal_gradients():
    x = torch.randn(2, 3, 37, 29)  # odd sizes; stage 0 is 10 x 8
    grads = []
    for flag in (False, True):
        model = micro(num_classes=4, drop_path=0.2, grad_checkpoint=flag).train()
        torch.manual_seed(1)  # same drop-path draws; checkpoint replays the RNG state
        model(x).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6, msg=k)


def test_stream_chunk_follows_the_device():
    """CPU tensors stream in `stream_chunk` positions, CUDA tensors in `stream_chunk_cuda` (fewer launches)."""
    op = micro(stream_chunk=23, stream_chunk_cuda=1000).layers[0].blocks[0].op
    assert (op.stream_chunk, op.stream_chunk_cuda) == (23, 1000)
    assert op.chunk_for(torch.zeros(1)) == 23
    if torch.cuda.is_available():
        assert op.chunk_for(torch.zeros(1, device="cuda")) == 1000
    with pytest.raises(ModelConfigError, match="stream_chunk_cuda"):
        VSSMConfig(stream_chunk_cuda=0)


def test_streaming_model_equals_plain_model():
    model = micro(stream_min_pixels=1, stream_chunk=23).eval()
    x = torch.randn(1, 3, 45, 66)  # stage maps 12x17, 6x9, 3x5, 2x3
    with torch.no_grad():
        streamed = model.forward_features(x)
    with torch.enable_grad():
        plain = model.forward_features(x)  # autograd on: the plain path everywhere
    assert (streamed - plain).abs().max().item() < 1e-5
