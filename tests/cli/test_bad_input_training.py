"""Bad input on the training and export side that once passed silently or failed late: recipe values out of range
(found only when their stage started, hours in), an empty stage list ("wrote model.pt" with none written),
`run --precision` missing the dense stage, `export` unable to read the project's own model files, and an export
size that leaves part-cells. Each error is one stderr line naming the option or file, exit 2 for an option
(`--set`, `--size`, `--model`) and 1 for a file, no traceback."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, assert_one_line_error, run_cli_captured, write_tiny_model

RECIPE = REPO / "pipelines" / "default.toml"


def assert_one_line(args, capsys, code: int, *parts: str) -> str:
    out, err = assert_one_line_error(args, capsys, code, *parts)
    assert "wrote" not in out
    return err


# ---- recipe value ranges and the stage list: refused before anything trains ----------------------------------


@pytest.mark.parametrize(
    "item, reason",
    [
        ("dense.grid=5", "dense.grid must be [low, high] patches per side"),
        ("dense.token_specificity=1.5", "dense.token_specificity must be in [0.5, 1)"),
        ("cells.epochs=0", "[cells] epochs must be >= 1, got 0"),
        ("context.ema=1.0", "[context] ema must be in [0, 1)"),
        ("mosaic_mil.pooled_bags=1", "mosaic_mil.pooled_bags must be >= 2"),
        ("cells.precision=fp16", "[cells] unknown precision 'fp16'"),
        ("recipe.stages=[]", "recipe.stages is empty: give at least one of cells, context"),
        ('recipe.stages=["cells","dens"]', "unknown recipe stage(s) ['dens']"),
        # each refused only after training, or never (a probe of the recipe runner, 2026-12-04)
        ("cells.mpp=0", "[cells] mpp must be > 0, got 0"),
        ("cells.token_px=33", "[cells] token_px must be a positive multiple of 32"),
        ("cells.seed=-5", "[cells] seed must be >= 0, got -5"),
        ("cells.lr=inf", "[cells] lr must be > 0, got inf"),
        ('cells.arch="nope"', "[cells] arch must be one of micro, micro_wide"),
        ('cells.device="tpu"', "[cells] device must be one of cpu, cuda, auto"),
        ("cells.epoch_size=-3", "[cells] epoch_size must be >= 1 (or null), got -3"),
        ("cells.valid_select=0", "[cells] valid_select must be >= 2 (or null), got 0"),
        ("cells.augment.blur_p=2", "[cells] augment.blur_p must be in [0, 1], got 2"),
        ('context.scan="bogus"', "[context] scan must be one of auto, reference"),
        ("dense.drop_path=2", "dense.drop_path must be in [0, 1), got 2"),
        ("dense.hard_top=0", "dense.hard_top must be in (0, 1], got 0"),
        ('mosaic_mil.pool=["bogus"]', "mosaic_mil.pool must be one of attention, topk, mix, count"),
        ("mosaic_mil.grid=[40,2]", "mosaic_mil.grid must be 3 to 64 patches a side"),
        ("mosaic_mil.pool=[]", "mosaic_mil.pool is empty"),
        ("mosaic_mil.ensemble=0", "mosaic_mil.ensemble must be an integer from 1 to 64, got 0"),
        ("mosaic_mil.synth_size=1000000", "mosaic_mil.synth_size must be in [1024, 400000]"),
        ('recipe.stages=["context","cells"]', "recipe.stages ['context', 'cells'] are out of order: stages run in"),
        ('recipe.stages=["cells","cells"]', "recipe.stages names cells twice"),
        ('context.init="x.pt"', "context.init: the context stage starts from the cell stage's model"),
    ],
)
def test_set_value_out_of_range_is_refused_up_front(tmp_path, capsys, item, reason):
    # data.train is given: without the up-front check the cell stage would start training
    args = ["run", RECIPE, "--set", f"data.train={tmp_path}", "--set", item, "--out", tmp_path / "o"]
    assert_one_line(args, capsys, 2, f"--set {item}: {reason}")
    assert not (tmp_path / "o").exists()  # nothing written, nothing trained


@pytest.mark.parametrize(
    "text, reason",
    [
        ("[dense]\ngrid = 5\n", "dense.grid must be [low, high]"),  # a section given but not run: still checked
        ("[recipe]\nstages = []\n", "recipe.stages is empty"),
        ('[recipe]\nstages = ["cells", "mosaic_mil"]\n[mosaic_mil]\nepochs = 0\n', "mosaic_mil.epochs must be >= 1"),
    ],
)
def test_value_out_of_range_in_the_recipe_file_is_bad_input(tmp_path, capsys, text, reason):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    assert_one_line(["run", recipe, "--out", tmp_path / "o"], capsys, 1, f"r.toml: {reason}")
    assert not (tmp_path / "o").exists()


def test_overrides_are_checked_together_and_the_culprit_named():
    from wsi_vssm.errors import UsageError
    from wsi_vssm.training.recipe import apply_overrides, load_recipe

    recipe = load_recipe(RECIPE)
    # pooled_bags=1 alone is refused (pooled bags need two); with no pooled sizes it is unused: both together pass
    both = apply_overrides(recipe, ["mosaic_mil.pooled_bags=1", "mosaic_mil.pooled_sizes=[]"])
    assert both["mosaic_mil"]["pooled_bags"] == 1
    with pytest.raises(UsageError, match=r"^--set mosaic_mil.pooled_bags=1: "):
        apply_overrides(recipe, ["cells.lr=0.1", "mosaic_mil.pooled_bags=1", "cells.epochs=3"])


def test_run_precision_reaches_every_stage_that_has_one(tmp_path, capsys):
    from wsi_vssm.training.recipe import recipe_schema

    out = tmp_path / "o"
    code, _, err = run_cli_captured(["run", RECIPE, "--precision", "bf16", "--out", out], capsys)
    assert code == 1 and "data.train" in err  # stops at the first stage's missing data, after resolving
    resolved = json.loads((out / "recipe.resolved.json").read_text())
    with_precision = [s for s, keys in recipe_schema().items() if isinstance(keys, dict) and "precision" in keys]
    assert {"cells", "context", "dense", "mosaic_mil"} <= set(with_precision)
    for stage in with_precision:  # [context] too: a recipe may set its own over [cells]'
        assert resolved[stage]["precision"] == "bf16", stage


# ---- export: the project's model files, and sizes the backbone maps to whole cells ---------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model") / "model.pt")


def test_export_reads_a_wsi_vssm_model_file(tiny_model, tmp_path, capsys):
    from wsi_vssm.models.export import build_backbone
    from wsi_vssm.models.model_file import load_backbone

    code, out, err = run_cli_captured(["export", "--checkpoint", tiny_model, "--onnx", tmp_path / "m.onnx",
                                       "--size", "64", "--no-check"], capsys)
    assert code == 0 and "error" not in err and (tmp_path / "m.onnx").is_file(), err  # torch's own warnings may show
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o644  # as every other output (mkstemp made it 0600)
    assert out.startswith(f"{tmp_path / 'm.onnx'}: micro features (1, 256, 2, 2) for a 64x64 input")
    model, (ref, _) = build_backbone(None, tiny_model), load_backbone(tiny_model)
    assert model.config.scan == "chunked" and model.config.stream_min_pixels is None  # traceable
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())  # the file's weights
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref.forward_features(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("option", ["--arch", "--model"])  # --model: the option's older name, kept working
def test_export_model_file_of_another_architecture_than_model(tiny_model, tmp_path, capsys, option):
    args = ["export", "--checkpoint", tiny_model, option, "tiny", "--onnx", tmp_path / "m.onnx"]
    assert_one_line(args, capsys, 2, "--arch tiny", "holds a micro backbone, not tiny", "leave --arch out")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("command", [["export", "--onnx", "m.onnx"], ["train", "cells", "--data", ".", "--valid", ".",
                                                                      "--out", "m.pt"]])
def test_an_unknown_architecture_is_named_by_the_option_it_came_from(command, tmp_path, capsys, monkeypatch):
    """`train cells` and `export` name an architecture, which every other command's --model (a model file) is
    not: --arch since 2026-12-06, --model still taken."""
    monkeypatch.chdir(tmp_path)
    for option in ("--arch", "--model"):
        assert_one_line([*command, option, "nope"], capsys, 2, "--arch nope")


def test_export_checkpoint_that_does_not_fit_is_one_line(tiny_model, tmp_path, capsys):
    raw = torch.load(tiny_model, weights_only=True)["state_dict"]
    bare = {k.removeprefix("backbone."): v for k, v in raw.items() if k.startswith("backbone.")}
    torch.save(bare, tmp_path / "bare.pt")  # micro weights offered for tiny
    args = ["export", "--checkpoint", tmp_path / "bare.pt", "--model", "tiny", "--onnx", tmp_path / "m.onnx"]
    assert_one_line(args, capsys, 1, "bare.pt does not match the model", "(a tiny backbone)")


@pytest.mark.parametrize("size, hint", [(63, "e.g. 32 or 64"), (100, "e.g. 96 or 128")])
def test_export_size_must_be_a_multiple_of_32(tmp_path, capsys, size, hint):
    args = ["export", "--size", str(size), "--onnx", tmp_path / "m.onnx"]
    assert_one_line(args, capsys, 2, f"--size {size}: must be a multiple of 32", hint)
    assert not (tmp_path / "m.onnx").exists()


def test_export_onnx_refuses_a_part_cell_size(tmp_path):
    from wsi_vssm.models.export import ExportError, build_backbone, export_onnx

    with pytest.raises(ExportError, match="multiple of 32"):
        export_onnx(build_backbone("micro"), tmp_path / "x.onnx", size=40)


def test_predict_with_an_unfinished_trainings_model_warns(cohort, tmp_path, capsys):
    """`train cells` writes its best epoch so far as OUT; killed there, that file looked like a finished model."""
    model = write_tiny_model(tmp_path / "m.pt", training_incomplete=True)
    code, out, err = run_cli_captured(["predict", next(cohort.glob("*.tif")), "--out", tmp_path / "o", "--model",
                                       model, "--device", "cpu", "--target-mpp", "4"], capsys)
    assert code == 0 and "a training run that has not finished" in err, err


def test_an_output_folder_that_takes_no_file_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """`train cells -o /sys/m.pt` trained a whole epoch, then failed with "Permission denied". The nearest existing
    folder of each training output is tried with an unnamed temporary file first (os.access says yes to root)."""
    import tempfile

    real = tempfile.TemporaryFile

    def refuse_in_locked(*args, dir=None, **kwargs):
        if dir is not None and "locked" in str(dir):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse_in_locked)
    (tmp_path / "locked").mkdir()
    data = tmp_path / "no-data"  # an empty folder, never read: the output is checked first
    data.mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\n")
    for args in (["train", "cells", "--data", data, "--valid", data, "-o", tmp_path / "locked" / "sub" / "m.pt"],
                 ["train", "mil", "--features", data, "--labels", labels, "--out", tmp_path / "locked" / "h.pt"],
                 ["run", RECIPE, "--out", tmp_path / "locked" / "run"]):
        err = assert_one_line(args, capsys, 1, f"cannot write in {tmp_path / 'locked'} (Permission denied)")
        assert "no-data" not in err
    assert_one_line(["train", "cells", "--data", data, "--valid", data, "-o", tmp_path / "free" / "m.pt"], capsys, 1,
                    "no-data")  # elsewhere the data is what is wrong


def test_a_missing_patch_source_names_its_recipe_key(tmp_path, capsys):
    """It said "patch source not found: /nope.tar", not which recipe key to fix."""
    args = ["run", RECIPE, "--set", f"data.train={tmp_path / 'nope.tar'}", "--set", 'recipe.stages=["cells"]',
            "--out", tmp_path / "o"]
    assert_one_line(args, capsys, 1, f"data.train = {tmp_path / 'nope.tar'}: no such patch folder or tar")
