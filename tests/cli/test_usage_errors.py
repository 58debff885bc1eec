"""Usage errors exit 2 in every command, with one stderr line naming the option: click's own checks and option
values only the library can judge (e.g. a region side that is no whole number of the model's tokens). Bad input
files still exit 1."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, assert_one_line_error, run_cli_captured

from wsi_vssm.errors import OptionError, UsageError

FAST = ["--device", "cpu", "--target-mpp", "4", "--reader-threads", "1"]


def assert_usage_error(args, capsys, option: str) -> str:
    return assert_one_line_error(args, capsys, 2, option)[1]


@pytest.mark.parametrize("extra, option", [
    (["--region-px", "100"], "--region-px"),  # no whole number of 32 px tokens
    (["--overlap-px", "33"], "--overlap-px"),
    (["--region-px", "64", "--overlap-px", "64"], "--overlap-px"),  # the overlap must be smaller than a region
    (["--region-px", "96"], "--overlap-px"),  # the default overlap (128) does not fit a 96 px region
    (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "--scheduler"),
    (["-q", "-v"], "--quiet"),
])
def test_predict_option_values_the_library_rejects(cohort, model_file, tmp_path, capsys, extra, option):
    slide = next(cohort.glob("*.tif"))
    err = assert_usage_error(["predict", slide, "--out", tmp_path / "o", "--model", model_file, *FAST, *extra], capsys,
                       option)
    assert slide.name not in err  # checked before any slide is read: no slide failed
    assert not (tmp_path / "o" / ".state").exists()


@pytest.mark.parametrize("scheduler", [
    "nonsense",  # not an address: distributed's ValueError
    "tcp://127.0.0.1:1",  # nothing listening: OSError once the connection timeout has passed
    "tls://127.0.0.1:1",  # TLS without a security config: distributed's TypeError
    "",  # e.g. an unset "$SCHEDULER": not a silent serial run
])
def test_a_scheduler_that_cannot_be_used_is_a_usage_error(cohort, model_file, tmp_path, capsys, monkeypatch,
                                                          scheduler):
    import gc

    from distributed import Client

    from wsi_vssm.runs import dask as run_dask

    monkeypatch.setattr(run_dask, "CONNECT_TIMEOUT_S", 0.5)
    before = {id(o) for o in gc.get_objects() if type(o) is Client}  # isinstance would read odd objects' __class__
    slide = next(cohort.glob("*.tif"))
    err = assert_usage_error(["predict", slide, "--out", tmp_path / "o", "--model", model_file, *FAST,
                              "--scheduler", scheduler], capsys, "--scheduler")
    assert slide.name not in err
    # the failed Client is collected at once: collected later, its __del__ could deadlock another Client's start
    assert not [o for o in gc.get_objects() if type(o) is Client and id(o) not in before]


def test_evaluate_and_extract_check_the_geometry_first(cohort, model_file, tmp_path, capsys):
    assert_usage_error(["evaluate", cohort, "--out", tmp_path / "e", "--model", model_file, *FAST,
                        "--region-px", "100"], capsys, "--region-px")
    slide = next(cohort.glob("*.tif"))
    assert_usage_error(["extract", slide, "--out", tmp_path / "x", "--model", model_file, "--device", "cpu",
                        "--overlap-px", "33"], capsys, "--overlap-px")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_on_a_machine_without_one(cohort, model_file, tmp_path, capsys):
    slide = next(cohort.glob("*.tif"))
    assert_usage_error(["predict", slide, "--out", tmp_path, "--model", model_file, "--device", "cuda"], capsys,
                       "--device")


def test_synth_option_values(tmp_path, capsys):
    assert_usage_error(["synth", tmp_path / "a", "--slides", "1", "--patients", "1"], capsys, "--patients")
    # 4 patients plan a macrometastasis (> 2 mm), which does not fit on 1,024 px slides at 0.5 um/px
    assert_usage_error(["synth", tmp_path / "b", "--patients", "4", "--size", "1024"], capsys, "--size")
    assert not (tmp_path / "b").exists()
    assert_usage_error(["synth", tmp_path / "c", "--slides", "1", "--grid", "-5"], capsys, "--grid")  # any kind
    # options the kind of cohort does not use were ignored without a word
    code, _, err = run_cli_captured(["synth", tmp_path / "d", "--slides", "1", "--size", "1024", "--grid", "5",
                                     "--split-seed", "3"], capsys)
    assert code == 0 and err.strip() == ("wsi-vssm: warning: --grid, --split-seed do not apply to drawn slides and "
                                         "are ignored"), err
    # synth's threads are --threads since 2026-12-06 (--workers is Dask processes elsewhere); the old name works
    from conftest import write_patch_folder

    write_patch_folder(tmp_path / "patches", 12, 0)
    code, _, err = run_cli_captured(["synth", tmp_path / "e", "--from-patches", tmp_path / "patches", "--slides", "1",
                                     "--grid", "3", "--workers", "2"], capsys)
    assert code == 0 and err.strip() == "wsi-vssm: warning: --threads does not apply to mosaic slides and is ignored"


def test_debug_after_the_command_is_taken(tmp_path, capsys):
    """`wsi-vssm info --debug X` was refused as "No such option '--debug'" although main() looked for it
    anywhere; the flag now works on either side of the command."""
    with pytest.raises(Exception, match="no such file or directory"):  # the traceback's exception, raised
        run_cli_captured(["info", "--debug", tmp_path / "none.svs"], capsys)


def test_training_option_values(tmp_path, capsys):
    data = tmp_path / "patches"
    data.mkdir()
    cells = ["train", "cells", "--data", data, "--valid", data, "--out", tmp_path / "m.pt"]
    assert_usage_error([*cells, "--mosaic-grid", "1"], capsys, "--mosaic-grid")
    assert_usage_error([*cells, "--scan", "nope"], capsys, "--scan")
    assert_usage_error([*cells, "--model", "nope"], capsys, "--arch nope")  # the option's older name
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\na,1\n")
    assert_usage_error(["train", "mil", "--features", data, "--labels", labels, "--out", tmp_path / "h.pt",
                  "--valid-labels", labels, "--valid-fraction", "0.2"], capsys, "--valid-fraction")
    assert_usage_error(["export", "--model", "nope", "--onnx", tmp_path / "m.onnx"], capsys, "--arch nope")
    assert_usage_error(["run", REPO / "pipelines" / "default.toml", "--set", "no-equals-sign"], capsys, "--set")


def test_an_option_and_its_older_name_with_different_values_are_refused(tmp_path, capsys):
    """`--arch micro --model tiny` trained tiny: the last spelling won without a word. Both names with different
    values now exit 2 naming both; the same value twice still runs."""
    data = tmp_path / "patches"
    data.mkdir()
    for args in (["train", "cells", "--data", data, "--valid", data, "--out", tmp_path / "m.pt", "--arch", "micro",
                  "--model", "tiny"],
                 ["export", "--model", "tiny", "--arch", "micro", "--onnx", tmp_path / "m.onnx"],
                 ["synth", tmp_path / "c", "--slides", "1", "--threads", "2", "--workers", "3"]):
        err = assert_usage_error(args, capsys, " / ")
        assert "different values" in err and ("--arch / --model" in err or "--threads / --workers" in err), err
    assert not (tmp_path / "c").exists()
    code, _, err = run_cli_captured(["synth", tmp_path / "d", "--slides", "1", "--size", "1024", "--threads", "1",
                                     "--workers", "1"], capsys)
    assert code == 0, err


def test_bad_input_files_still_exit_1(cohort, model_file, tmp_path, capsys):
    slide = next(cohort.glob("*.tif"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model" * 100)
    for args in (["predict", tmp_path / "missing.tif", "--out", tmp_path / "o", "--model", model_file, *FAST],
                 ["predict", slide, "--out", tmp_path / "o", "--model", garbage, *FAST],
                 ["evaluate", tmp_path / "no-cohort", "--out", tmp_path / "e", "--model", model_file]):
        code, _, err = run_cli_captured(args, capsys)
        assert code == 1 and err.count("wsi-vssm: error:") == 1 and "Traceback" not in err, (args, err)


def test_an_empty_model_says_so(cohort, tmp_path, capsys):
    """--model "" read as the current folder (".: is a folder, not a model file")."""
    slide = next(cohort.glob("*.tif"))
    for args in (["predict", slide, "--out", tmp_path / "o", "--model", "", *FAST],
                 ["extract", slide, "--out", tmp_path / "x", "--model", " "]):
        code, _, err = run_cli_captured(args, capsys)
        assert code == 1 and "the model is empty" in err and err.count("\n") == 1, (args, err)


def test_defaults_that_do_not_fit_the_model_are_bad_input_not_usage():
    """A model file with 96 px tokens: the default 128 px overlap does not fit, but the user gave no option."""
    from wsi_vssm.commands.options import option_geometry

    with pytest.raises(UsageError) as err:
        option_geometry("cpu", 96, None, None)
    assert not isinstance(err.value, OptionError) and err.value.exit_code == 1
    with pytest.raises(OptionError, match="--overlap-px"):
        option_geometry("cpu", 96, None, 100)
    assert option_geometry("cpu", 96, None, 96) == (2016, 96, 0.25)  # 21 whole tokens


def test_the_mpp_options_take_the_readers_plausible_range():
    from wsi_vssm.commands.options import MPP_RANGE
    from wsi_vssm.io.formats import PLAUSIBLE_MPP

    assert (MPP_RANGE.min, MPP_RANGE.max) == PLAUSIBLE_MPP


def _commands(group, ctx, path=()):
    import click

    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, ctx, (*path, name))
        else:
            yield " ".join((*path, name)), cmd


def test_one_option_name_means_one_range_and_default_in_every_command():
    """`train cells` alone trained on the CPU of a GPU machine unless told, and took 0.05-20 um/px where every
    other command takes the readers' range; synth keeps its writers' own 0.05 floor."""
    import click

    from wsi_vssm.cli import cli
    from wsi_vssm.commands.options import MPP_RANGE

    ctx = click.Context(cli)
    devices, mpps = {}, {}
    for name, cmd in _commands(cli, ctx):
        for p in cmd.params:
            if p.name == "device":
                devices[name] = p.default
            if "--mpp" in p.opts or "--fallback-mpp" in p.opts or "--target-mpp" in p.opts:
                mpps[f"{name} {p.opts[0]}"] = (p.type.min, p.type.max)
    assert {"predict", "evaluate", "extract", "train cells", "train mil"} <= set(devices), devices
    assert set(devices.values()) == {"auto"}, devices
    assert "train cells --mpp" in mpps and len(mpps) > 5, mpps
    odd = {k: v for k, v in mpps.items() if v != (MPP_RANGE.min, MPP_RANGE.max) and not k.startswith("synth ")}
    assert not odd, odd


@pytest.mark.parametrize("extra, option", [
    (["--threshold", "nan"], "--threshold"),  # NaN passes a plain range check and would call every slide normal
    (["--cell-threshold", "inf"], "--cell-threshold"),
    (["--mpp", "100"], "--mpp"),  # a magnification typed as an mpp: millions of regions, hung for minutes
    (["--mpp", "1e-9"], "--mpp"),
    (["--target-mpp", "1e6"], "--target-mpp"),  # a petabyte resample
    (["--target-mpp", "nan"], "--target-mpp"),
])
def test_non_finite_and_implausible_numbers(cohort, model_file, tmp_path, capsys, extra, option):
    """click's own range check (exit 2, one line), before anything is read or written."""
    slide = next(cohort.glob("*.tif"))
    assert_one_line_error(["predict", slide, "--out", tmp_path / "o", "--model", model_file, *extra], capsys, 2,
                          f"Invalid value for '{option}'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, parts", [
    # click before 8.4 says "No such option: --tile-size", later ones "No such option '--tile-size'."
    (["predict", "a.svs", "--tile-size", "5"], ["No such option", "--tile-size", "(see 'wsi-vssm predict --help')"]),
    (["predict"], ["Missing argument 'SLIDES...'", "wsi-vssm predict --help"]),
    (["frob"], ["No such command 'frob'", "(see 'wsi-vssm --help')"]),
    (["train", "cells", "--epochs", "many"], ["'--epochs'", "wsi-vssm train cells --help"]),
])
def test_clicks_own_usage_errors_are_one_line(capsys, args, parts):
    """click prints Usage / Try / Error on three lines; ours say it on one, with the command's help to look at."""
    assert_one_line_error(args, capsys, 2, *parts)


def test_a_group_alone_prints_its_help(capsys):
    code, out, err = run_cli_captured(["train"], capsys)
    assert code == 2 and err.startswith("Usage: wsi-vssm train") and "cells" in err and "mil" in err, err


def test_a_slide_without_tissue_is_not_printed_as_failed(cohort, model_file, tmp_path, capsys):
    """evaluate printed "failed=1" for a blank slide whose row says no_tissue (exit 0, no failure warning)."""
    import numpy as np
    import tifffile

    blank = tmp_path / "blank.tif"
    tifffile.imwrite(blank, np.full((1024, 1024, 3), 245, np.uint8), tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / 2.0, 1e4 / 2.0), resolutionunit="CENTIMETER")
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide,label\n" + "".join(f"{cohort / n}.tif,{int(n.startswith('tumor'))}\n"
                                                  for n in ("normal_001", "tumor_001", "normal_002"))
                        + f"{blank},1\n")
    code, out, _ = run_cli_captured(["evaluate", manifest, "--out", tmp_path / "ev", "--model", model_file,
                                     "--bootstrap", "100", *FAST], capsys)
    assert code == 0 and "n=3, failed=0, no tissue=1 (not in the metrics)" in out, out
