"""load_checkpoint: upstream-style files, legacy names, strict mismatch errors, unreadable files."""

from __future__ import annotations

import sys
import types
from collections import OrderedDict

import pytest
import torch

from wsi_vssm.errors import WsiVssmError
from wsi_vssm.models import CheckpointError, CheckpointMismatchError, create_model, load_checkpoint
from wsi_vssm.models.checkpoint import remap_legacy_keys


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("micro", num_classes=3, scan="reference", **kw)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap", ["model", "state_dict", "bare"])
def test_loads_upstream_layout_and_bare_state_dict(tmp_path, wrap):
    src, dst = make_model(0), make_model(1)
    sd = src.state_dict()
    obj = sd if wrap == "bare" else {wrap: sd, "epoch": 262, "max_accuracy": 82.5}
    torch.save(obj, tmp_path / "ckpt.pth")
    assert load_checkpoint(dst, tmp_path / "ckpt.pth") is dst
    assert_same_weights(src, dst)


def legacy_names(sd):
    """Upstream's older names for the same tensors (the inverse of the documented renames)."""
    out = OrderedDict()
    for k, v in sd.items():
        k = k.replace("classifier.norm.", "norm.").replace("classifier.head.", "head.")
        k = k.replace(".blocks.0.norm.", ".blocks.0.ln_1.").replace(".op.", ".self_attention.")
        k = k.replace("patch_embed.0.", "patch_embed.proj.").replace("patch_embed.2.", "patch_embed.norm.")
        out["module." + k] = v
    return out


def test_legacy_names_are_remapped(tmp_path):
    src, dst = make_model(0), make_model(1)
    legacy = legacy_names(src.state_dict())
    assert any(".ln_1." in k for k in legacy) and "module.head.weight" in legacy
    torch.save({"model": legacy}, tmp_path / "old.pth")
    load_checkpoint(dst, tmp_path / "old.pth")
    assert_same_weights(src, dst)
    # block norms and the norm2 names are left alone
    remapped = remap_legacy_keys({"layers.0.blocks.1.norm2.weight": 0, "norm.bias": 1})
    assert list(remapped) == ["layers.0.blocks.1.norm2.weight", "classifier.norm.bias"]


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    sd = make_model(0).state_dict()
    del sd["layers.2.blocks.1.op.Ds"]
    sd["layers.9.blocks.0.op.A_logs"] = torch.zeros(3, 1)
    sd["classifier.head.weight"] = torch.zeros(7, 256)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(make_model(1), tmp_path / "bad.pth")
    err = info.value
    assert isinstance(err, WsiVssmError)
    lines = str(err).splitlines()
    assert "bad.pth" in lines[0] and "1 missing, 1 unexpected, 1 with another shape" in lines[0]
    assert err.missing == ["layers.2.blocks.1.op.Ds"]
    assert err.unexpected == ["layers.9.blocks.0.op.A_logs"]
    assert err.shape_mismatches == [("classifier.head.weight", (7, 256), (3, 256))]
    assert any("(7, 256)" in line and "(3, 256)" in line for line in lines[1:])


def test_config_mismatch_is_reported_not_silently_loaded(tmp_path):
    torch.save(make_model(0).state_dict(), tmp_path / "micro.pth")
    with pytest.raises(CheckpointMismatchError, match="missing"):
        load_checkpoint(make_model(0, depths=(1, 1, 3, 1)), tmp_path / "micro.pth")


def test_missing_and_corrupt_files_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nope.pth") as info:
        load_checkpoint(make_model(), tmp_path / "nope.pth")
    assert "\n" not in str(info.value)
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 definitely not a torch file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*corrupt.pth") as info:
        load_checkpoint(make_model(), tmp_path / "corrupt.pth")
    assert "\n" not in str(info.value)
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        load_checkpoint(make_model(), tmp_path / "empty.pth")


def test_pickled_config_objects_do_not_block_loading(tmp_path, monkeypatch):
    """Upstream's training checkpoints pickle a yacs CfgNode next to the weights; yacs need not be installed."""
    mod = types.ModuleType("fakeyacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "fakeyacs.config", "CfgNode"
    mod.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "fakeyacs", types.ModuleType("fakeyacs"))
    monkeypatch.setitem(sys.modules, "fakeyacs.config", mod)
    cfg = CfgNode(MODEL=CfgNode(TYPE="vssm"))
    cfg.__dict__.update(frozen=True, deprecated=set())  # instance state, as CfgNode keeps
    src = make_model(0)
    torch.save({"model": src.state_dict(), "config": cfg}, tmp_path / "upstream.pth")
    monkeypatch.delitem(sys.modules, "fakeyacs.config")  # loading must not import it
    dst = make_model(1)
    load_checkpoint(dst, tmp_path / "upstream.pth")
    assert_same_weights(src, dst)


def test_meta_model_takes_the_checkpoint_tensors(tmp_path):
    src = make_model(0)
    torch.save({"model": src.state_dict()}, tmp_path / "c.pth")
    with torch.device("meta"):
        dst = create_model("micro", num_classes=3)
    load_checkpoint(dst, tmp_path / "c.pth")
    assert not any(p.is_meta for p in dst.parameters())
    assert_same_weights(src, dst)
