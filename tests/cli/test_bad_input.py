"""Bad input to every cohort command: one clear stderr line naming the file and the problem, a documented exit
code (docs/cohorts.md), no traceback unless --debug, and nothing already finished lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, run_cli_captured, write_patch_folder

from wsi_vssm.cli import main
from wsi_vssm.models.slide_model import SlideModel, save_model
from wsi_vssm.runs.state import read_state
from wsi_vssm.synth import make_cohort

FAST = ["--device", "cpu", "--target-mpp", "4", "--region-px", "512", "--overlap-px", "64", "--reader-threads", "1"]
EXTRACT = ["--device", "cpu", "--target-mpp", "4", "--region-px", "512", "--overlap-px", "64", "--min-tissue", "0"]
SHARED_BAD = ("broken.svs", "unopenable.tiff", "unreadable.svs", "tcga-cr-7395-01a-01-ts1.svs")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model, one good slide under a unicode path with spaces, and a zoo of bad slide files."""
    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    model = root / "tiny.pt"
    save_model(SlideModel.create("micro", scan="cpu").eval(), model,
               metadata={"slide_threshold": 0.5, "cell_threshold": 0.5})
    make_cohort(root / "c", 1, seed=1, size=1024, mpp=2.0, workers=1)
    good = root / "dír with spaces" / "slïde ü.tif"
    good.parent.mkdir()
    shutil.copy(next((root / "c").glob("*.tif")), good)
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.svs").write_bytes(b"")
    (bad / "truncated.tif").write_bytes(good.read_bytes()[:3000])
    (bad / "misnamed.svs").write_text("slide,label\na,1\n")  # a CSV with a slide's extension
    (bad / "folder.tif").mkdir()
    slides = [bad / "missing.tif", bad / "folder.tif", bad / "zero.svs", bad / "truncated.tif", bad / "misnamed.svs"]
    slides += [SHARED_DATA / "slides" / n for n in SHARED_BAD if (SHARED_DATA / "slides" / n).exists()]
    return {"root": root, "model": model, "good": good, "bad": slides}


def _run(args, capsys) -> tuple[int, str, str]:
    return run_cli_captured(args, capsys)


def _one_line_each(err: str, names: list[str]) -> None:
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("wsi-vssm: error:")]
    for name in names:
        assert sum(name in ln for ln in errors) == 1, (name, err)


def test_predict_and_extract_go_past_every_bad_slide(files, tmp_path, capsys):
    slides = [*files["bad"], files["good"]]
    names = [p.name for p in files["bad"]]
    out = tmp_path / "out ü"
    code, stdout, err = _run(["predict", *slides, "--out", out, "--model", files["model"], *FAST], capsys)
    assert code == 3
    _one_line_each(err, names)
    assert (out / "slïde ü" / "prediction.json").is_file() and stdout.count("slïde ü: probability") == 1

    code, stdout, err = _run(["extract", *slides, "--out", tmp_path / "feat", "--model", files["model"], *EXTRACT],
                             capsys)
    assert code == 3
    _one_line_each(err, names)
    assert (tmp_path / "feat" / "slïde ü.zarr").is_dir()


def test_shared_no_mpp_slide_asks_for_mpp(files, tmp_path, capsys):
    tcga = SHARED_DATA / "slides" / SHARED_BAD[3]
    if not tcga.exists():
        pytest.skip("shared data not present")
    code, _, err = _run(["predict", tcga, "--out", tmp_path, "--model", files["model"], *FAST], capsys)
    assert code == 1 and "--mpp" in err and tcga.name in err and err.count("\n") == 1


def test_evaluate_records_bad_slides_of_a_manifest(files, tmp_path, capsys):
    import csv

    manifest = tmp_path / "m.csv"
    rows = [f'"{p}",0' for p in files["bad"]] + [f'"{files["good"]}",1']
    manifest.write_text("slide,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    code, _, err = _run(["evaluate", manifest, "--out", tmp_path / "ev", "--model", files["model"], "--bootstrap",
                         "200", *FAST], capsys)
    assert code == 3 and "Traceback" not in err
    with open(tmp_path / "ev" / "predictions.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["failed"] * len(files["bad"]) + ["done"]
    assert all(r["error"] for r in table[:-1])


@pytest.mark.parametrize("case", ["missing", "folder", "zero", "truncated", "garbage", "nan", "wrong-format"])
def test_corrupt_model_file_is_one_line_for_every_command(files, tmp_path, capsys, case):
    model = tmp_path / f"model-{case}.pt"
    if case == "folder":
        model.mkdir()
    elif case == "zero":
        model.write_bytes(b"")
    elif case == "truncated":
        model.write_bytes(files["model"].read_bytes()[:5000])
    elif case == "garbage":
        model.write_bytes(os.urandom(4096))
    elif case == "nan":
        m = SlideModel.create("micro", scan="cpu")
        with torch.no_grad():
            next(m.parameters()).fill_(float("nan"))
        save_model(m, model)
    elif case == "wrong-format":
        torch.save({"format": "something-else"}, model)
    for cmd, extra in (("predict", FAST), ("extract", EXTRACT)):
        code, _, err = _run([cmd, files["good"], "--out", tmp_path / cmd, "--model", model, *extra], capsys)
        assert code == 1 and model.name in err and "Traceback" not in err, (cmd, err)
        assert err.count("wsi-vssm: error:") == 1, err


def test_nan_features_fail_the_slide_clearly(files, tmp_path):
    """A model that yields NaN (damaged in memory, or overflowing float16) never writes outputs as results."""
    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.pipeline.predict import PredictParams
    from wsi_vssm.progress import QUIET, Progress
    from wsi_vssm.runs.execute import SlideTask
    from wsi_vssm.runs.jobs import predict_job
    from wsi_vssm.runs.runner import RunOptions, run_slides

    model = load_model(files["model"])
    with torch.no_grad():
        model.backbone.patch_embed[0].weight.fill_(float("nan"))
    params = PredictParams(device="cpu", target_mpp=4.0, region_px=512, overlap_px=64, reader_threads=1)
    job = predict_job(tmp_path, "nan-model", model, params)
    summary = run_slides([SlideTask("slïde ü", str(files["good"]))], job, RunOptions(), Progress(QUIET))
    (o,) = summary.outcomes
    assert o.status == "failed" and "NaN" in o.message and "slïde ü" in o.message
    assert not (tmp_path / "slïde ü" / "prediction.json").exists()
    assert read_state(tmp_path, "predict", "slïde ü")["error_type"] == "FeatureStoreError"


@pytest.mark.parametrize("text, problem", [
    ("slide,label\na.tif,1\na.tif,0\n", "listed again"),
    ("slide,split\na.tif,train\n", "'label' columns"),
    ("# nothing\n", "no slides"),
    ("", "no slides"),
    ("slide,label\na.tif,maybe\n", "label 'maybe'"),
])
def test_bad_manifests_are_one_line(files, tmp_path, capsys, text, problem):
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    code, _, err = _run(["evaluate", manifest, "--out", tmp_path / "ev", "--model", files["model"], *FAST], capsys)
    assert code == 1 and problem in err and "m.csv" in err and err.count("\n") == 1


def test_missing_cohort_and_binary_manifest(files, tmp_path, capsys):
    for cohort, problem in ((tmp_path / "nope.csv", "no such"), (tmp_path, "reference.csv")):
        code, _, err = _run(["evaluate", cohort, "--out", tmp_path / "ev", "--model", files["model"]], capsys)
        assert code == 1 and problem in err and err.count("\n") == 1
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 100)
    code, _, err = _run(["evaluate", binary, "--out", tmp_path / "ev", "--model", files["model"]], capsys)
    assert code == 1 and "bin.csv" in err and "Traceback" not in err


def test_disk_full_mid_run_keeps_finished_slides(files, tmp_path, capsys, monkeypatch):
    from wsi_vssm.outputs import overlay

    second = tmp_path / "second.tif"
    shutil.copy(files["good"], second)
    real = overlay.overlay_png

    def full(path, *a, **k):
        if "second" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(overlay, "overlay_png", full)
    args = ["predict", files["good"], second, "--out", tmp_path / "o", "--model", files["model"], *FAST]
    code, _, err = _run(args, capsys)
    assert code == 1 and "Traceback" not in err  # the run stops: every later slide would fail the same way
    line = next(ln for ln in err.splitlines() if "No space left" in ln)
    assert "second: cannot write its outputs" in line and "overlay.png" in line and "the run stopped" in line
    assert read_state(tmp_path / "o", "predict", "slïde ü")["status"] == "done"
    assert read_state(tmp_path / "o", "predict", "second")["status"] == "failed"
    assert (tmp_path / "o" / "slïde ü" / "prediction.json").is_file()
    monkeypatch.setattr(overlay, "overlay_png", real)
    code, out, _ = _run(args, capsys)  # not the slide's fault: tried again without --retry-failed
    assert code == 0 and "slïde ü: up to date" in out and "second: probability" in out


def test_a_damaged_patch_fails_alone_in_a_patch_folder_evaluation(files, tmp_path, capsys):
    """As one broken slide in a cohort: the other patches are scored, the damaged one is named and counted."""
    import csv

    write_patch_folder(tmp_path / "p", 4, 0)
    (tmp_path / "p" / "1" / "junk.jpg").write_text("not an image")
    args = ["evaluate", tmp_path / "p", "--mpp", "0.97", "--out", tmp_path / "ev", "--model", files["model"],
            "--bootstrap", "100"]
    code, out, err = _run(args, capsys)
    assert code == 3 and "Traceback" not in err
    _one_line_each(err, ["1/junk.jpg: not an image Pillow can read"])
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == 8 and metrics["n_failed"] == 1 and metrics["auc"] is not None
    with open(tmp_path / "ev" / "predictions.csv", newline="") as f:
        rows = {r["slide"]: r for r in csv.DictReader(f)}
    assert len(rows) == 9 and rows["1/junk.jpg"]["status"] == "failed" and rows["1/junk.jpg"]["probability"] == ""
    assert all(r["status"] == "done" for name, r in rows.items() if name != "1/junk.jpg")


def test_a_patch_folder_takes_the_cell_threshold_and_refuses_slide_options(files, tmp_path, capsys):
    """--cell-threshold and --threshold were ignored on a patch folder (its figures stayed at the model's cell
    threshold, so a user believed they had changed them); metrics.json did not say how its intervals were made."""
    write_patch_folder(tmp_path / "p", 4, 0)
    args = ["evaluate", tmp_path / "p", "--mpp", "0.97", "--model", files["model"], "--bootstrap", "100"]
    code, _, err = _run([*args, "--out", tmp_path / "a", "--cell-threshold", "0.25", "--workers", "2",
                         "--cells-geojson"], capsys)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert code == 0 and metrics["threshold"] == 0.25
    assert sum("warning: --workers, --cells-geojson: without effect on a patch folder" in ln
               for ln in err.splitlines()) == 1, err
    assert metrics["intervals"]["resamples"] == 100 and metrics["intervals"]["level"] == 0.95
    for extra in (["--threshold", "0.3"], ["--extent-threshold", "0.2"], ["--target-mpp", "2"]):
        code, out, err = _run([*args, "--out", tmp_path / "b", *extra], capsys)
        assert code == 2 and f"{extra[0]}: a patch folder is scored patch by patch" in err and not out, (extra, err)
    assert not (tmp_path / "b").exists()


def test_patches_smaller_than_the_models_are_warned_once(model_file, tmp_path, capsys):
    """96 px patches at a wrong --mpp 0.485 were halved to 48 px, and their scores fell near 0 without a word."""
    write_patch_folder(tmp_path / "p", 4, 0)
    args = ["evaluate", tmp_path / "p", "--model", model_file, "--bootstrap", "100"]
    code, _, err = _run([*args, "--mpp", "0.485", "--out", tmp_path / "a"], capsys)
    small = [ln for ln in err.splitlines() if "smaller than the 96 px patches the model was trained on" in ln]
    assert code == 0 and len(small) == 1, err
    assert "scored at 48 x 48 px (resized from 96 x 96 px" in small[0] and "check --mpp" in small[0], small
    code, _, err = _run([*args, "--mpp", "0.97", "--out", tmp_path / "b"], capsys)
    assert code == 0 and "smaller than" not in err and "sizes" not in err, err
    # a few 64 px and 192 px patches among 96 px ones: said as if every patch were 64 px, the 192 px ones not at all
    from PIL import Image

    img = Image.open(tmp_path / "p" / "0" / "p0.jpg")
    img.resize((64, 64)).save(tmp_path / "p" / "0" / "small.jpg")
    img.resize((192, 192)).save(tmp_path / "p" / "1" / "large_a.jpg")
    img.resize((192, 192)).save(tmp_path / "p" / "1" / "large_b.jpg")
    code, _, err = _run([*args, "--mpp", "0.97", "--out", tmp_path / "c"], capsys)
    assert code == 0 and "1 of the 11 patches are scored at 64 x 64 px, smaller than the 96 px" in err, err
    assert "the patches come in 3 sizes (8 of 96 x 96 px, 2 of 192 x 192 px, 1 of 64 x 64 px)" in err, err
    # two sizes are several too; 86 px is more than a tenth smaller than 96 (87 px is not)
    (tmp_path / "p" / "1" / "large_b.jpg").unlink()
    img.resize((86, 86)).save(tmp_path / "p" / "0" / "small.jpg")
    code, _, err = _run([*args, "--mpp", "0.97", "--out", tmp_path / "d"], capsys)
    assert "1 of the 10 patches are scored at 86 x 86 px" in err and "come in 3 sizes" in err, err
    img.resize((87, 87)).save(tmp_path / "p" / "0" / "small.jpg")
    (tmp_path / "p" / "1" / "large_a.jpg").unlink()
    code, _, err = _run([*args, "--mpp", "0.97", "--out", tmp_path / "e"], capsys)
    assert "smaller than" not in err and "the patches come in 2 sizes (8 of 96 x 96 px, 1 of 87 x 87 px)" in err, err


def test_non_square_patches_keep_their_shape_when_resized(model_file, tmp_path, capsys):
    """Width and height go to the resize in that order: 128 x 64 px patches at --mpp 0.485 become 64 x 32."""
    from PIL import Image

    write_patch_folder(tmp_path / "p", 2, 0)
    for f in (tmp_path / "p").rglob("*.jpg"):
        Image.open(f).resize((128, 64)).save(f)
    code, _, err = _run(["evaluate", tmp_path / "p", "--model", model_file, "--bootstrap", "100", "--mpp", "0.485",
                         "--out", tmp_path / "a"], capsys)
    assert code == 0 and "scored at 64 x 32 px (resized from 128 x 64 px" in err, err


def test_an_earlier_evaluation_inside_the_patch_folder_is_not_a_class(model_file, tmp_path, capsys):
    """Its plots (PNG) made an evaluation's OUT inside the folder look like a third class to the next run."""
    write_patch_folder(tmp_path / "p", 2, 0)
    args = ["evaluate", tmp_path / "p", "--model", model_file, "--bootstrap", "100", "--mpp", "0.97"]
    assert _run([*args, "--out", tmp_path / "p" / "ev1"], capsys)[0] == 0
    code, _, err = _run([*args, "--out", tmp_path / "p" / "ev2"], capsys)
    assert code == 0 and "not a class" not in err, err


def test_the_auc_line_says_when_the_scores_do_not_separate(model_file, tmp_path, capsys):
    """The warning said the scores do not separate, and the AUC line under it read as a result."""
    import numpy as np
    from PIL import Image

    for label in "01":  # the same image in both classes: every patch scores the same
        (tmp_path / "p" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((96, 96, 3), 200, np.uint8)).save(tmp_path / "p" / label / f"p{i}.png")
    code, out, err = _run(["evaluate", tmp_path / "p", "--mpp", "0.97", "--out", tmp_path / "o", "--model",
                           model_file, "--bootstrap", "100"], capsys)
    assert code == 0 and "the scores do not separate tumour from normal patches" in err, err
    line = next(ln for ln in out.splitlines() if ln.startswith("AUC "))
    assert line.startswith("AUC 0.500 (95% CI undefined: every resample gives this AUC), not meaningful: the "
                           "scores do not separate"), line
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["auc"] == 0.5  # still there


def test_corrupt_feature_store_is_redone(files, tmp_path, capsys):
    args = ["extract", files["good"], "--out", tmp_path, "--model", files["model"], *EXTRACT]
    assert _run(args, capsys)[0] == 0
    (tmp_path / "slïde ü.zarr" / "zarr.json").write_text("{not json")
    code, out, err = _run(args, capsys)
    assert code == 0 and "up to date" not in out and "cells from" in out
    from wsi_vssm.pipeline.store import FeatureStore

    assert len(FeatureStore.open(tmp_path / "slïde ü.zarr")) > 0


def test_corrupt_heatmap_store_is_redone(files, tmp_path, capsys):
    args = ["predict", files["good"], "--out", tmp_path, "--model", files["model"], *FAST]
    assert _run(args, capsys)[0] == 0
    (tmp_path / "slïde ü" / "heatmap.ome.zarr" / ".zattrs").write_text("{broken")
    code, out, _ = _run(args, capsys)
    assert code == 0 and "probability" in out and "up to date" not in out


def test_read_only_output_folder(files, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    cmd = [sys.executable, "-m", "wsi_vssm", "predict", str(files["good"]), "--out", str(out), "--model",
           str(files["model"]), *FAST]
    if os.geteuid() != 0:
        out.chmod(0o555)
    elif shutil.which("unshare") and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0:
        # root ignores permissions: make the folder a read-only bind mount in a private mount namespace
        script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'
        cmd = ["unshare", "-m", "sh", "-c", script, "sh", str(out), *cmd]
    else:
        pytest.skip("running as root without mount namespaces: cannot make a read-only folder")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        out.chmod(0o755)
    assert res.returncode == 1, res.stderr
    assert res.stderr.count("\n") == 1 and "ro" in res.stderr and "Traceback" not in res.stderr
    assert "cannot write to the output folder" in res.stderr


def test_a_closed_standard_output_does_not_stop_the_run(model_file, cohort, tmp_path):
    """`evaluate ... | head -1`: the first result line after the reader had gone stopped the run with exit 1, no
    message and no metrics.json (click's own broken-pipe exit). The run goes on and says once why no lines come."""
    out = tmp_path / "ev"
    cmd = [sys.executable, "-m", "wsi_vssm", "evaluate", str(cohort), "--out", str(out), "--model", str(model_file),
           "--bootstrap", "100", *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert err.count("standard output was closed") == 1 and "Traceback" not in err and "Exception ignored" not in err
    assert json.loads((out / "metrics.json").read_text())["n"] == 3
    # every command, not only the cohort ones: synth stopped after its first slide (a training run after the
    # epoch whose line could not be printed)
    cmd = [sys.executable, "-m", "wsi_vssm", "synth", str(tmp_path / "syn"), "--slides", "3", "--seed", "0",
           "--size", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0 and err.count("standard output was closed") == 1, err
    assert len(list((tmp_path / "syn").glob("*.tif"))) == 3


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_standard_output_on_a_full_disk_does_not_stop_the_run(tmp_path):
    """`wsi-vssm synth ... > log` on a full disk stopped after the first slide (exit 1, "No space left on
    device" blamed on the run): the lines are dropped, said once, and the command finishes."""
    cmd = [sys.executable, "-m", "wsi_vssm", "synth", str(tmp_path / "syn"), "--slides", "3", "--seed", "0",
           "--size", "1024"]
    with open("/dev/full", "w") as full:
        res = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("standard output cannot be written (No space left on device)") == 1, res.stderr
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr
    assert len(list((tmp_path / "syn").glob("*.tif"))) == 3


def test_debug_shows_the_traceback(files, tmp_path, capsys):
    with pytest.raises(Exception) as err:
        main(["--debug", "predict", str(tmp_path / "none.tif"), "--out", str(tmp_path), "--model",
              str(tmp_path / "none.pt")])
    assert "none.pt" in str(err.value)


def test_a_file_name_with_a_newline_is_escaped(files, tmp_path, capsys):
    """`new<LF>line.tif` once failed after all its work (a one-line title refused the name), leaving outputs."""
    slide = tmp_path / "new\nline.tif"
    shutil.copy(files["good"], slide)
    code, stdout, err = _run(["predict", slide, "--out", tmp_path / "o", "--model", files["model"], *FAST], capsys)
    assert code == 0 and "Traceback" not in err, err
    record = json.loads((tmp_path / "o" / "new\\nline" / "prediction.json").read_text(encoding="utf-8"))
    assert record["slide"] == "new\\nline" and record["probability"] is not None
    assert "new\\nline: probability" in stdout


def test_a_file_name_that_is_not_utf8(files, tmp_path, capsys):
    """A Latin-1 name (`b\\xe9.tif`) reaches Python with a lone surrogate, which UTF-8 cannot encode: the slide
    is analysed and its name written with a `\\xe9` escape, instead of a traceback that stopped the cohort."""
    slide = tmp_path / os.fsdecode(b"b\xe9.tif")
    shutil.copy(files["good"], slide)
    code, stdout, err = _run(["predict", slide, "--out", tmp_path / "o", "--model", files["model"], *FAST], capsys)
    assert code == 0 and "Traceback" not in err, err
    record = json.loads((tmp_path / "o" / "b\\xe9" / "prediction.json").read_text(encoding="utf-8"))
    assert record["slide"] == "b\\xe9" and record["probability"] is not None


def test_a_long_message_is_cut_at_a_word_not_inside_one():
    """Warnings over the one-line limit were cut mid-word: "... (median Maha...", a word the reader must guess."""
    from wsi_vssm.errors import one_line

    text = "slide s1: out of domain: token features " + "far from training " * 20 + "(median Mahalanobis distance)"
    cut = one_line(text, 120)
    assert len(cut) <= 120 and cut.endswith("...") and text.startswith(cut[:-3])
    assert text[len(cut) - 3] == " ", cut  # the last word kept is whole
    assert one_line("x" * 200, 50) == "x" * 47 + "..."  # one long word: cut where it must be


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_AS is a Unix limit")
def test_an_address_space_limit_too_small_to_load_is_one_line_not_a_hang(tmp_path):
    """Under `ulimit -v` of about 1.5 GiB or less, `predict` spun at 100% CPU for 26 minutes inside OpenBLAS's
    start-up, deaf to SIGTERM. A command now refuses such a limit in one line before loading anything; help and
    --version still answer."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY and hard < 1 << 30:
        pytest.skip("the hard address-space limit is already under 1 GiB")

    def one_gib():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, hard))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "wsi_vssm", *args], capture_output=True, text=True,
                              preexec_fn=one_gib, timeout=120, cwd=tmp_path)

    r = run("predict", "slide.svs", "--out", "out")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "wsi-vssm: error: the address-space limit (ulimit -v) is 1024 MiB; wsi-vssm needs at least 2048 MiB to "
        "load its libraries: raise the limit (ulimit -v 2097152 or more)"]
    assert not (tmp_path / "out").exists()
    assert run("predict", "--help").returncode == 0 and run("--version").returncode == 0
