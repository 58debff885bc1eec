"""Bad option values and bad input that once passed silently or failed unclearly: `run --set` with a wrong type or
an unknown key, unknown keys in a recipe file, `--amp` beside a contradicting `--precision`, an output path under
a regular file, a slide's implausible stated resolution, a patch source that is no tar. Each is one stderr line
naming the option or file, a documented exit code (2 usage, 1 bad input) and no traceback."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tarfile

import numpy as np
import pytest
import tifffile
from conftest import REPO, assert_one_line_error, run_cli_captured, write_patch_folder

RECIPE = REPO / "pipelines" / "default.toml"


def assert_one_line(args, capsys, code: int, *parts: str) -> str:
    return assert_one_line_error(args, capsys, code, *parts)[1]


# ---- 1, 2: run --set and the recipe's keys ------------------------------------------------------------------


@pytest.mark.parametrize(
    "item, parts",
    [
        ("cells.epochs=abc", ("--set cells.epochs=abc", "expected an integer", '"abc"')),
        ("cells.epochs=2.5", ("cells.epochs", "expected an integer", "2.5")),
        ("cells.ema=true", ("cells.ema", "expected a number", "true")),
        ("dense.grid=[3,x]", ("dense.grid", "expected a list of integers")),
        ("cells.augment.flip_rot=1", ("cells.augment.flip_rot", "expected true or false")),
        ("cells.augment={blur_p=true}", ("cells.augment.blur_p", "expected a number")),
    ],
)
def test_set_value_of_the_wrong_type_is_a_usage_error(tmp_path, capsys, item, parts):
    assert_one_line(["run", RECIPE, "--set", item, "--out", tmp_path / "o"], capsys, 2, *parts)
    assert not (tmp_path / "o").exists()  # refused before anything is written


@pytest.mark.parametrize(
    "item, parts",
    [
        ("nosuch.key=1", ("unknown recipe section [nosuch]", "known: recipe, data, cells")),
        ("cels.epochs=1", ("unknown recipe section [cels]", "did you mean cells?")),
        ("cells.epoch=1", ("unknown recipe key cells.epoch", "did you mean cells.epochs?")),
        ("data.trian=/x", ("data.trian", "did you mean data.train?")),
        ("cells.augment.flip=1", ("cells.augment.flip", "did you mean cells.augment.flip_rot?")),
        ("mosaic_mil.pooled_size=[2]", ("did you mean mosaic_mil.pooled_sizes?",)),
        ("cells.epochs.x=1", ("cells.epochs is not a table",)),
    ],
)
def test_unknown_set_key_is_refused_with_the_closest_known_key(tmp_path, capsys, item, parts):
    assert_one_line(["run", RECIPE, "--set", item, "--out", tmp_path / "o"], capsys, 2, f"--set {item}:", *parts)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "text, parts",
    [
        ("[cells]\nepoch = 3\n", ("unknown recipe key cells.epoch", "did you mean cells.epochs?")),
        ("[nosuch]\nx = 1\n", ("unknown recipe section [nosuch]",)),
        ('[cells]\nepochs = "abc"\n', ("cells.epochs: expected an integer", '"abc"')),
        ("[context.augment]\nblur = 0.1\n", ("context.augment.blur", "did you mean context.augment.blur_p?")),
        ('[recipe]\nstages = "cells"\nout = 3\n', ("recipe.out: expected a string",)),
    ],
)
def test_unknown_key_or_wrong_type_in_the_recipe_file_is_bad_input(tmp_path, capsys, text, parts):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    assert_one_line(["run", recipe, "--out", tmp_path / "o"], capsys, 1, "r.toml: ", *parts)
    assert not (tmp_path / "o").exists()


def test_every_key_the_recipe_and_the_stages_use_is_known():
    from wsi_vssm.training.cells import TrainCellsConfig
    from wsi_vssm.training.dense import DenseConfig
    from wsi_vssm.training.mosaic import MosaicMILConfig
    from wsi_vssm.training.recipe import apply_overrides, check_recipe, load_recipe

    recipe = load_recipe(RECIPE)  # the shipped recipe passes its own check

    def leaves(table, key=()):
        for k, v in table.items():
            yield from leaves(v, (*key, k)) if isinstance(v, dict) else [((*key, k), v)]

    sets = [f"{'.'.join(k)}={json.dumps(v)}" for k, v in leaves(recipe)]  # each value set again as given
    assert apply_overrides(recipe, sets) == recipe
    configs = {
        "cells": TrainCellsConfig,
        "context": TrainCellsConfig,
        "dense": DenseConfig,
        "mosaic_mil": MosaicMILConfig,
    }
    check_recipe({name: dataclasses.asdict(cls()) for name, cls in configs.items()})  # every field, its default's type
    for key in (
        "data.slides=/s",
        "attach_mil.checkpoint=m.pt",
        "recipe.out=o",
        "recipe.stages=cells",
        "cells.init=m.pt",
        "dense.resume=true",
        "mosaic_mil.topk=8",
        "mosaic_mil.pool=topk",
    ):
        apply_overrides(recipe, [key])  # keys the runner reads itself, and one-item spellings the configs take
    assert apply_overrides(recipe, ["data.train=2024"])["data"]["train"] == "2024"  # a key taking a path: text


# ---- 3: --amp against --precision ---------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["predict", "extract"])
@pytest.mark.parametrize(
    "flags, parts",
    [
        (["--amp", "--precision", "fp32"], ("--amp", "--precision fp32")),
        (["--precision", "fp32", "--amp"], ("--amp", "--precision fp32")),  # either order
        (["--no-amp", "--precision", "bf16"], ("--no-amp", "--precision bf16")),
    ],
)
def test_amp_contradicting_precision_is_refused(model_file, tmp_path, capsys, cmd, flags, parts):
    args = [cmd, tmp_path / "s.tif", "--out", tmp_path / "o", "--model", model_file, "--device", "cpu", *flags]
    assert_one_line(args, capsys, 2, *parts, "contradicts")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--amp"],
        ["--amp", "--precision", "bf16"],
        ["--amp", "--precision", "auto"],
        ["--precision", "fp32"],
        ["--no-amp", "--precision", "fp32"],
        [],
    ],
)
def test_amp_agreeing_with_precision_is_accepted(flags):
    """Only a contradiction is refused: --amp stays the old spelling of --precision bf16."""
    from wsi_vssm.commands.extract import command as extract
    from wsi_vssm.commands.predict import command as predict

    for cmd in (predict, extract):
        ctx = cmd.make_context(cmd.name, ["s.tif", "--out", "o", "--model", "m.pt", *flags])
        assert ctx.params["precision"] in ("fp32", "bf16", "auto", None)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_amp_check_leaves_commands_without_amp_alone(precision):
    """`train cells` shares predict's --precision option, and so its callback, but has no --amp."""
    from wsi_vssm.commands.train_cells import command

    ctx = command.make_context("cells", ["--data", ".", "--valid", ".", "--out", "m.pt", "--precision", precision])
    assert ctx.params["precision"] == precision


# ---- 4: an output under a regular file ----------------------------------------------------------------------


@pytest.fixture
def afile(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    write_patch_folder(tmp_path / "p", 2, 0)
    return tmp_path / "afile"


@pytest.mark.parametrize("option", ["--out", "--log"])
def test_train_cells_output_under_a_file(afile, tmp_path, capsys, option):
    out = afile / "m.pt" if option == "--out" else tmp_path / "m.pt"
    log = ["--log", afile / "log.csv"] if option == "--log" else []
    p = tmp_path / "p"
    args = ["train", "cells", "--data", p, "--valid", p, "--out", out, "--epochs", "1", *log]
    err = assert_one_line(args, capsys, 2, option, f"{afile} is a file, not a folder")
    assert "File exists" not in err and not list(tmp_path.glob("*.log.csv"))  # before any training


def test_train_mil_output_under_a_file(afile, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\na,1\n")
    args = ["train", "mil", "--features", tmp_path / "p", "--labels", labels, "--out", afile / "h.pt"]
    assert_one_line(args, capsys, 2, "--out", f"{afile} is a file, not a folder")
    assert_one_line([*args[:-1], tmp_path / "h.pt", "--log", afile / "h.csv"], capsys, 2, "--log", "is a file")


def test_run_output_under_a_file(afile, tmp_path, capsys):
    assert_one_line(["run", RECIPE, "--out", afile / "sub"], capsys, 2, "--out", f"{afile} is a file, not a folder")
    # from the recipe (here a --set of recipe.out): bad input, exit 1, naming recipe.out
    assert_one_line(["run", RECIPE, "--set", f"recipe.out={afile / 'sub'}"], capsys, 1, "recipe.out", "is a file")


# ---- 5: an implausible stated resolution -------------------------------------------------------------------


def _tiff(path, **resolution):
    a = np.full((256, 256, 3), 230, np.uint8)
    tifffile.imwrite(path, a, tile=(128, 128), **resolution)
    return path


@pytest.mark.parametrize("backend", ["auto", "tifffile"])
def test_an_implausible_stated_resolution_is_named_not_called_missing(model_file, tmp_path, capsys, backend):
    slide = _tiff(tmp_path / "mpp50.tif", resolution=(200, 200), resolutionunit="CENTIMETER")  # 50 um/px
    args = ["predict", slide, "--out", tmp_path / "o", "--model", model_file, "--device", "cpu", "--backend", backend]
    err = assert_one_line(args, capsys, 1, "mpp50.tif", "implausible 50 um/px", "ignored", "--mpp")
    assert "no resolution" not in err
    code, out, _ = run_cli_captured(["info", slide, "--backend", backend], capsys)
    assert code == 0 and "implausible 50 um/px" in out and "--mpp" in out and "states no resolution" not in out


def test_a_slide_without_a_stated_resolution_still_says_so(model_file, tmp_path, capsys):
    slide = _tiff(tmp_path / "none.tif")  # tifffile's default: resolution unit NONE
    args = ["predict", slide, "--out", tmp_path / "o", "--model", model_file, "--device", "cpu"]
    err = assert_one_line(args, capsys, 1, "none.tif", "no resolution", "--mpp")
    assert "implausible" not in err


@pytest.mark.parametrize(
    "props, stated",
    [
        ({"openslide.mpp-x": "50"}, "50 um/px (openslide.mpp-x"),
        ({"aperio.MPP": "0"}, "0 um/px (SVS MPP"),
        ({"tiff.XResolution": "(72, 1)", "tiff.ResolutionUnit": "2"}, "352.8 um/px (TIFF"),  # 72 dpi
        ({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}, "352.8 um/px (TIFF"),  # OpenSlide's spelling
        ({"tiff.XResolution": "(72, 1)", "tiff.ResolutionUnit": "1"}, None),  # unit NONE: nothing stated
        ({"openslide.mpp-x": "0.25"}, None),  # plausible: nothing ignored
        ({}, None),
    ],
)
def test_ignored_mpp(props, stated):
    from wsi_vssm.io.base import ignored_mpp

    text = ignored_mpp(props)
    assert (text is None) if stated is None else (stated in text and "implausible" in text)


# ---- 6: a patch source that is no tar and no folder ---------------------------------------------------------


def _train(src, valid, tmp_path):
    return ["train", "cells", "--data", src, "--valid", valid, "--out", tmp_path / "m.pt", "--epochs", "1"]


@pytest.mark.parametrize("name, content", [("notes.bin", b"hello\n"), ("empty.tar", b"")])
def test_a_patch_source_that_is_no_tar_is_one_line(tmp_path, capsys, name, content):
    write_patch_folder(tmp_path / "p", 2, 0)
    (tmp_path / name).write_bytes(content)
    args = _train(tmp_path / name, tmp_path / "p", tmp_path)
    err = assert_one_line(args, capsys, 1, name, "neither a folder nor a tar")
    assert "method gz" not in err


def test_a_cut_compressed_tar_is_one_line(tmp_path, capsys):
    write_patch_folder(tmp_path / "p", 4, 0)
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "p", arcname="data")
    data = (tmp_path / "t.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    args = _train(tmp_path / "cut.tar.gz", tmp_path / "p", tmp_path)
    assert_one_line(args, capsys, 1, "cut.tar.gz", "cannot read tar")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.timeout(60)
def test_a_fifo_as_patch_source_fails_instead_of_waiting(tmp_path):
    from wsi_vssm.training.data.patches import PatchDataError, load_patches

    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(PatchDataError, match="fifo: neither a folder nor a tar"):
        load_patches(tmp_path / "fifo")


# ---- 7: the bf16 speed-up the precision module quotes ---------------------------------------------------------


def test_precision_docstring_quotes_the_latest_measurement():
    from wsi_vssm.models import precision

    latest = re.findall(
        r"\((\d\.\d+)x micro, (\d\.\d+)x tiny, (\d\.\d+)x training\)", (REPO / "docs" / "scan.md").read_text()
    )[-1]
    doc = " ".join(precision.__doc__.split())
    micro, tiny, step = latest
    assert f"`micro` inference {micro}x" in doc and f"`tiny` {tiny}x" in doc and f"training step {step}x" in doc
    assert f"about {micro}x on a CPU without AMX" in doc


# ---- 8: a negative seed ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, option", [
    ("synth {o} --slides 1 --seed -3", "--seed"),
    ("synth {o} --slides 1 --split-seed -3", "--split-seed"),
    ("train cells --data {d} --valid {d} -o {o}/m.pt --seed -3", "--seed"),
])
def test_a_negative_seed_is_refused_naming_the_option(tmp_path, capsys, command, option):
    """`synth --seed -3` was a numpy traceback ("expected non-negative integer"); `train cells --seed -3` said
    "seed must be >= 0" with exit 1, naming no option."""
    write_patch_folder(tmp_path / "d", 2, seed=0)
    args = command.format(o=tmp_path / "o", d=tmp_path / "d").split()
    assert_one_line(args, capsys, 2, f"Invalid value for '{option}': -3 is not in the range x>=0")
