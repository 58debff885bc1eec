"""SlideModel files: round trip under weights_only=True, one-line errors, MIL checkpoints, the packaged default."""

from __future__ import annotations

import io

import pytest
import torch

from wsi_vssm.errors import UsageError, WsiVssmError
from wsi_vssm.models.model_file import MODEL_FORMAT
from wsi_vssm.models.slide_model import (
    ModelFileError,
    SlideModel,
    attach_mil,
    default_model_path,
    load_model,
    save_model,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SlideModel.create("micro", mpp=0.97, token_px=32, name="t").eval()


def test_cell_logits_shape(model):
    with torch.no_grad():
        out = model.cell_logits(torch.randn(2, 3, 96, 64))
    assert out.shape == (2, 3, 2)


def test_round_trip_identical(model, tmp_path):
    path = save_model(model, tmp_path / "m.pt", {"seed": 1, "metrics": {"auc": 0.5}})
    ckpt = torch.load(path, weights_only=True)  # plain containers and tensors only
    assert ckpt["format"] == MODEL_FORMAT and ckpt["stride"] == 32 and ckpt["token_px"] == 32
    assert all(k.startswith(("backbone.", "mil.")) for k in ckpt["state_dict"])
    loaded = load_model(path)
    assert (loaded.mpp, loaded.token_px, loaded.stride, loaded.name) == (0.97, 32, 32, "t")
    assert loaded.metadata["metrics"] == {"auc": 0.5}
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.cell_logits(x), model.cell_logits(x), rtol=0, atol=0)
        feats = torch.randn(1, 5, 256)
        torch.testing.assert_close(loaded.mil(feats).slide_logit, model.mil(feats).slide_logit, rtol=0, atol=0)
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write leaves no temporary behind


def _one_line(err: pytest.ExceptionInfo, name: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and name in msg and isinstance(err.value, WsiVssmError)


def test_missing_corrupt_and_foreign_files(model, tmp_path):
    with pytest.raises(ModelFileError) as e:
        load_model(tmp_path / "nope.pt")
    _one_line(e, "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(ModelFileError) as e:
        load_model(bad)
    _one_line(e, "bad.pt")
    good = save_model(model, tmp_path / "good.pt")
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ModelFileError) as e:
        load_model(tmp_path / "trunc.pt")
    _one_line(e, "trunc.pt")
    torch.save({"model": model.backbone.state_dict()}, tmp_path / "upstream.pt")
    with pytest.raises(ModelFileError) as e:
        load_model(tmp_path / "upstream.pt")
    _one_line(e, "upstream.pt")


@pytest.mark.parametrize("change, said", [
    ({"dims": [32, 64, 128, 1_000_000]}, "1000000"),  # a 46-line traceback trying to allocate 2 TB
    ({"dims": [32, 64, 128, 8192]}, "8192"),  # 4.5 GB and 24 s before the mismatch was said
    ({"depths": [2, 2, 100_000, 2]}, "more than 512"),  # 9.6 GB, then a traceback
])
def test_an_absurd_config_is_refused_before_anything_is_allocated(model, tmp_path, change, said):
    ckpt = torch.load(save_model(model, tmp_path / "m.pt"), weights_only=True)
    ckpt["backbone_config"].update(change)
    torch.save(ckpt, tmp_path / "absurd.pt")
    with pytest.raises(ModelFileError) as e:  # shapes are compared on torch's meta device, allocating nothing
        load_model(tmp_path / "absurd.pt")
    assert said in str(e.value) and "\n" not in str(e.value)


def test_a_member_compressed_to_inflate_is_refused_before_it_inflates(model, tmp_path, monkeypatch):
    """torch stores members uncompressed: a 15 MB file holding a tensor of deflated zeros took 74 s and 8 GB to
    load, and an extra 4 GiB member 10 s of checksum reading. Refused from the zip's directory."""
    import zipfile

    from wsi_vssm.models import checkpoint
    from wsi_vssm.training.checkpoint import load_checkpoint, save_checkpoint

    monkeypatch.setattr(checkpoint, "MAX_INFLATED", 2**20)  # the limit, scaled down: 2 MiB stands for gigabytes
    path = save_model(model, tmp_path / "m.pt")
    load_model(path)  # torch's own file: every member stored
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{z.namelist()[0].split('/')[0]}/data/zz_bomb", bytes(2 * 2**20))
    with pytest.raises(ModelFileError, match=r"zz_bomb inflates from [\d,]+ to 2,097,152 bytes") as e:
        load_model(path)
    _one_line(e, "m.pt")
    save_checkpoint(tmp_path / "c.pt", {"w": torch.zeros(3)}, {})
    with zipfile.ZipFile(tmp_path / "c.pt", "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("c/data/zz_bomb", bytes(2 * 2**20))
    with pytest.raises(UsageError, match="c.pt: not a training checkpoint .*zz_bomb inflates"):
        load_checkpoint(tmp_path / "c.pt", {})


def test_a_damaged_model_file_is_refused(model, tmp_path):
    """torch.load ignores the zip's checksums: a file with one flipped byte in its weights loaded and predicted
    with altered weights, without a word."""
    import struct
    import zipfile

    good = save_model(model, tmp_path / "good.pt")
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        member = max(z.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", raw[member.header_offset + 26:member.header_offset + 30])
    raw[member.header_offset + 30 + name_len + extra_len + member.file_size // 2] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(raw)
    with pytest.raises(ModelFileError, match=r"flipped.pt: a model file damaged \(.* fails its checksum\)") as e:
        load_model(tmp_path / "flipped.pt")
    _one_line(e, "flipped.pt")
    load_model(good)  # the undamaged file still loads


def test_bad_metadata_values_are_the_model_files_fault(model, tmp_path):
    """cell_threshold "high" or slide_threshold None were tracebacks at predict; 1.5, NaN or a negative merge
    distance failed every slide of a cohort, blaming the slide; a list as metadata was a traceback."""
    ckpt = torch.load(save_model(model, tmp_path / "m.pt"), weights_only=True)
    cases = [({"cell_threshold": "high"}, "cell_threshold must be a probability"),
             ({"slide_threshold": None}, "slide_threshold must be a probability"),
             ({"threshold": float("nan")}, "threshold must be a probability"),
             ({"lesion_extent_threshold": 1.5}, "lesion_extent_threshold must be a probability"),
             ({"lesion_merge_distance_cells": -3}, "lesion_merge_distance_cells must be a number of cells"),
             (["a", "list"], "its metadata is a list")]
    for i, (meta, message) in enumerate(cases):
        torch.save({**ckpt, "metadata": meta}, tmp_path / f"meta{i}.pt")
        with pytest.raises(ModelFileError, match=message) as e:
            load_model(tmp_path / f"meta{i}.pt")
        _one_line(e, f"meta{i}.pt")
    torch.save({**ckpt, "metadata": {"cell_threshold": 1, "lesion_merge_distance_cells": 0}}, tmp_path / "ok.pt")
    assert load_model(tmp_path / "ok.pt").metadata["cell_threshold"] == 1


def test_other_architecture_is_one_line(model, tmp_path):
    ckpt = torch.load(save_model(model, tmp_path / "m.pt"), weights_only=True)
    ckpt["backbone_config"]["depths"] = [1, 1, 1, 1]  # the weights no longer fit the stated architecture
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    (tmp_path / "arch.pt").write_bytes(buf.getvalue())
    with pytest.raises(ModelFileError) as e:
        load_model(tmp_path / "arch.pt")
    _one_line(e, "arch.pt")


def test_attach_mil_keeps_cell_head(model, tmp_path):
    torch.manual_seed(1)
    other = SlideModel.create("micro").mil
    sd = {k: v for k, v in other.state_dict().items() if not k.startswith("cell_head.")}
    torch.save({"format": "wsi-vssm-mil/1", "mil_config": other.config.to_dict(), "state_dict": sd},
               tmp_path / "mil.pt")
    m = load_model(save_model(model, tmp_path / "m.pt"))
    head = m.mil.cell_head.weight.clone()
    attach_mil(m, tmp_path / "mil.pt")
    assert torch.equal(m.mil.cell_head.weight, head)
    assert torch.equal(m.mil.classifier.weight, other.classifier.weight)
    torch.save({"format": "wsi-vssm-mil/1", "mil_config": other.config.to_dict(),
                "state_dict": {**sd, "extra.weight": torch.zeros(1)}}, tmp_path / "bad_mil.pt")
    with pytest.raises(ModelFileError) as e:
        attach_mil(m, tmp_path / "bad_mil.pt")
    _one_line(e, "bad_mil.pt")
    with pytest.raises(ModelFileError) as e:
        attach_mil(m, tmp_path / "m.pt")  # a whole model file is not a MIL checkpoint
    _one_line(e, "m.pt")


def test_half_precision_file(model, tmp_path):
    full = save_model(model, tmp_path / "f32.pt")
    half = save_model(model, tmp_path / "f16.pt", half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(load_model(half).cell_logits(x), model.cell_logits(x), rtol=0.05, atol=0.05)
    # one backbone hash however the file is read: extract's stores (load_backbone), train mil's cell head and
    # the loaded model (attach_mil) had two, so a MIL head trained on this file's features was refused
    from wsi_vssm.models.model_file import load_backbone, state_dict_hash
    from wsi_vssm.training.mil import cell_head_from_model

    hashes = {load_backbone(half)[1].model_hash, cell_head_from_model(half)[1],
              state_dict_hash(load_model(half).backbone.state_dict())}
    assert len(hashes) == 1
    assert load_backbone(full)[1].model_hash == state_dict_hash(model.backbone.state_dict())  # fp32: as before


def test_default_model_loads():
    if not default_model_path().is_file():
        pytest.skip("packaged default weights not built yet (pipelines/default.toml)")
    m = load_model("default")
    assert m.mpp == pytest.approx(0.97, abs=0.05) and m.token_px == 32 and m.stride == 32
    assert default_model_path().stat().st_size <= 10 * 2**20
    with torch.no_grad():
        assert m.cell_logits(torch.zeros(1, 3, 96, 96)).shape == (1, 3, 3)


def test_default_model_file_is_plain_weights_only_data():
    # A user can inspect the shipped file with torch.load(weights_only=True) and no allow-listed classes.
    if not default_model_path().is_file():
        pytest.skip("packaged default weights not built yet (pipelines/default.toml)")
    ckpt = torch.load(default_model_path(), weights_only=True)
    assert ckpt["format"] == "wsi-vssm-model/1" and ckpt["mpp"] == pytest.approx(0.97, abs=0.05)
    holdout = ckpt["metadata"]["metrics"]["valid_holdout"]
    assert 0.5 < holdout["auc"] <= 1.0


def test_saved_metadata_strings_are_exact_str(model, tmp_path):
    save_model(model, tmp_path / "m.pt", metadata={"torch_version": torch.__version__})
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    assert ckpt["metadata"]["torch_version"] == str(torch.__version__)


def _mil_checkpoint(path, mil, metadata: dict) -> None:
    torch.save({"format": "wsi-vssm-mil/1", "mil_config": mil.config.to_dict(), "state_dict": mil.state_dict(),
                "metadata": metadata}, path)


def test_attach_mil_takes_a_cell_head_only_if_the_trainer_trained_it(model, tmp_path):
    """`train mil` without --model stores its random, frozen cell head: attaching it turned the heatmap to noise."""
    from wsi_vssm.models.model_file import state_dict_hash

    torch.manual_seed(2)
    other = SlideModel.create("micro").mil  # a full head: random cell head included
    own = {"features": {"model_hash": state_dict_hash(model.backbone.state_dict())}}
    m = load_model(save_model(model, tmp_path / "m.pt"))
    head = m.mil.cell_head.weight.clone()
    _mil_checkpoint(tmp_path / "frozen.pt", other, {**own, "train_config": {"train_cell_head": False}})
    attach_mil(m, tmp_path / "frozen.pt")
    assert torch.equal(m.mil.cell_head.weight, head) and torch.equal(m.mil.classifier.weight, other.classifier.weight)
    _mil_checkpoint(tmp_path / "trained.pt", other, {**own, "train_config": {"train_cell_head": True}})
    attach_mil(m, tmp_path / "trained.pt")
    assert torch.equal(m.mil.cell_head.weight, other.cell_head.weight)


def test_attach_mil_refuses_a_head_trained_on_another_backbones_features(model, tmp_path):
    m = load_model(save_model(model, tmp_path / "m.pt"))
    _mil_checkpoint(tmp_path / "mil.pt", m.mil, {"features": {"model_hash": "0123456789abcdef"}})
    with pytest.raises(ModelFileError, match="features of another backbone") as e:
        attach_mil(m, tmp_path / "mil.pt")
    _one_line(e, "mil.pt")


def test_a_mil_checkpoint_given_as_a_model_says_how_to_attach_it(model, tmp_path):
    _mil_checkpoint(tmp_path / "mil.pt", model.mil, {})
    with pytest.raises(ModelFileError, match="a MIL head from `train mil`: attach it") as e:
        load_model(tmp_path / "mil.pt")
    _one_line(e, "mil.pt")


def test_the_attach_stage_resets_the_slide_threshold(model, tmp_path, capsys):
    from wsi_vssm.models.model_file import state_dict_hash
    from wsi_vssm.training.recipe import run_recipe

    base = save_model(model, tmp_path / "base.pt", metadata={"slide_threshold": 0.71, "threshold": 0.71})
    own = {"features": {"model_hash": state_dict_hash(model.backbone.state_dict())}}
    _mil_checkpoint(tmp_path / "mil.pt", model.mil, own)
    recipe = {"recipe": {"stages": ["attach_mil"]},
              "attach_mil": {"checkpoint": str(tmp_path / "mil.pt"), "model": str(base)}}
    out = run_recipe(recipe, tmp_path / "out", progress=False)
    attached = load_model(out)
    assert attached.metadata["slide_threshold"] == 0.5 and attached.metadata["threshold"] == 0.5
    assert "was 0.71" in capsys.readouterr().out


def test_loading_a_model_file_does_not_load_torchs_compiler():
    """The shape check builds the model on the meta device first; the SSM parameters' init ran there too, and the
    meta kernels of its ops imported torch._dynamo and torch._inductor (0.8 s on every first load, and an empty
    torchinductor folder in the temp directory). A shape-only model skips that init."""
    import subprocess
    import sys

    code = ("import sys\nfrom wsi_vssm.models.slide_model import load_model\nm = load_model('default')\n"
            "print(sorted(k for k in ('torch._dynamo', 'torch._inductor') if k in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_model_with_an_ensemble_head_round_trips_and_takes_one_by_attach(model, tmp_path):
    """A model file whose slide head is a MILEnsemble loads as one (the same outputs); an ensemble MIL checkpoint
    attached to a model with one head replaces it, keeping the model's cell head; `train mil` still finds it."""
    from wsi_vssm.models.mil import AttentionMIL, MILEnsemble
    from wsi_vssm.training.mil import cell_head_from_model, save_mil

    torch.manual_seed(2)
    heads = [AttentionMIL(model.mil.config) for _ in range(3)]
    for h in heads[1:]:
        h.cell_head.load_state_dict(heads[0].cell_head.state_dict())
    ens = MILEnsemble.of(heads)
    save_mil(tmp_path / "ens.pt", ens, {})
    m = load_model(save_model(model, tmp_path / "m.pt"))
    head = m.mil.cell_head.weight.clone()
    attach_mil(m, tmp_path / "ens.pt")
    assert isinstance(m.mil, MILEnsemble) and m.mil.config.members == 3
    assert torch.equal(m.mil.cell_head.weight, head)  # the trainer's frozen cell head is not taken
    assert torch.equal(m.mil.members[2].classifier.weight, heads[2].classifier.weight)
    m.mil.calibrate(2.0, 0.5, 0.1)
    loaded = load_model(save_model(m, tmp_path / "e.pt"))
    assert isinstance(loaded.mil, MILEnsemble) and loaded.mil.config.size_slope == pytest.approx(0.1)
    feats = torch.randn(1, 7, 256)
    with torch.no_grad():
        torch.testing.assert_close(loaded.mil(feats).slide_logit, m.mil.eval()(feats).slide_logit, rtol=0, atol=0)
    assert torch.equal(cell_head_from_model(tmp_path / "e.pt")[0]["weight"], head)
    from wsi_vssm.commands.model_info import format_model_info, model_info

    info = model_info(str(tmp_path / "e.pt"))
    assert info["slide_head"] == {"pool": "attention", "members": 3, "size_term": True}
    assert "slide head:  attention, the mean of 3 heads trained with different seeds" in format_model_info(info)


def test_a_model_files_name_and_domain_reach_the_terminal_escaped(model, tmp_path):
    """A model file named `...\\x1b]0;PWNED\\x07\\x1b[2J` cleared the screen and retitled the window from `info`
    and predict's closing note; a name ending in a newline failed every slide after its backbone had run (the
    overlay's title must be one line)."""
    from wsi_vssm.models.slide_model import domain_text

    hostile = SlideModel(model.backbone, model.mil, model.mpp, model.token_px, "m\x1b]0;PWNED\x07\x1b[2J\n")
    path = save_model(hostile, tmp_path / "m.pt", {"domain": "H&E\x1b[32m All slides normal.\r\n"})
    loaded = load_model(path)
    assert loaded.name == "m\\x1b]0;PWNED\\x07\\x1b[2J\\n"
    assert domain_text(loaded) == "H&E\\x1b[32m All slides normal.\\r\\n"
