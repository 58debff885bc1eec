"""`extract --format h5 / pt`: the feature files CLAM and TRIDENT read, beside (or instead of) the zarr store."""

from __future__ import annotations

import json
import socket

import h5py
import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

from wsi_vssm.pipeline.feature_files import FORMATS, check_formats, feature_file_ok
from wsi_vssm.pipeline.store import FeatureStore
from wsi_vssm.runs.state import lock_path

ARGS = ["--model", "micro", "--target-mpp", "2.0", "--region-px", "256", "--overlap-px", "64", "--min-tissue", "0",
        "--device", "cpu"]


def _slide(path, seed: int = 5):
    rng = np.random.default_rng(seed)
    img = rng.integers(60, 220, (320, 384, 3), dtype=np.uint8)
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb", resolution=(1e4 / 2.0, 1e4 / 2.0),
                     resolutionunit="CENTIMETER")
    return path


def _extract(*args):
    from wsi_vssm.commands.extract import command

    return CliRunner().invoke(command, [*map(str, args), *ARGS])


def test_the_cli_offers_every_format_the_writer_knows():
    from wsi_vssm.commands.extract import command

    choice = next(p for p in command.params if p.name == "formats").type
    assert tuple(choice.choices) == FORMATS


def test_h5_and_pt_hold_the_stores_features_and_coords(tmp_path):
    slide = _slide(tmp_path / "s1.tif")
    out = tmp_path / "feat"
    res = _extract(slide, "--out", out, "--format", "zarr", "--format", "h5", "--format", "pt")
    assert res.exit_code == 0, res.output
    store = FeatureStore.open(out / "s1.zarr").load()
    with h5py.File(out / "h5_files" / "s1.h5", "r") as f:
        assert f["features"].dtype == np.float32 and f["coords"].dtype == np.int64
        np.testing.assert_array_equal(f["features"][...], store.features.astype(np.float32))  # float16 widened
        np.testing.assert_array_equal(f["coords"][...], store.coords_px)
        np.testing.assert_array_equal(f["tissue"][...], store.tissue.astype(np.float32))
        assert f["coords"].attrs["patch_size"] == 32 and f["coords"].attrs["patch_size_level0"] == 32
        assert f["coords"].attrs["cell_px0"] == store.attrs["cell_px0"] and "format" not in f.attrs
        assert f.attrs["model_id"] == "micro" and f.attrs["mpp"] == 2.0 and f.attrs["slide"] == "s1"
        assert list(f.attrs["cell_grid"]) == store.attrs["cell_grid"]
    pt = torch.load(out / "pt_files" / "s1.pt", weights_only=True)
    assert pt.dtype == torch.float32 and pt.shape == store.features.shape
    np.testing.assert_array_equal(pt.numpy(), store.features.astype(np.float32))
    assert "h5_files/s1.h5" in res.stdout and "pt_files/s1.pt" in res.stdout


def test_h5_alone_writes_no_store_and_a_damaged_file_is_redone(tmp_path):
    slide = _slide(tmp_path / "s1.tif")
    out = tmp_path / "feat"
    assert _extract(slide, "--out", out, "--format", "h5").exit_code == 0
    h5 = out / "h5_files" / "s1.h5"
    assert h5.is_file() and not (out / "s1.zarr").exists() and feature_file_ok(h5, "h5")
    again = _extract(slide, "--out", out, "--format", "h5")
    assert again.exit_code == 0 and "up to date" in again.stdout
    h5.write_bytes(h5.read_bytes()[:200])  # cut short, as by a full disk or a broken copy
    assert not feature_file_ok(h5, "h5")
    redone = _extract(slide, "--out", out, "--format", "h5")
    assert redone.exit_code == 0 and "up to date" not in redone.stdout and feature_file_ok(h5, "h5")
    # the zarr store too, now: these are other outputs, so the slide runs again
    both = _extract(slide, "--out", out, "--format", "h5", "--format", "zarr")
    assert both.exit_code == 0 and "up to date" not in both.stdout and FeatureStore.open(out / "s1.zarr")


def test_a_foreign_or_missing_file_is_not_taken_for_features(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a tensor")
    assert not feature_file_ok(tmp_path / "x.pt", "pt") and not feature_file_ok(tmp_path / "none.h5", "h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((2, 2)))
    assert not feature_file_ok(tmp_path / "other.h5", "h5")


def test_the_order_of_formats_does_not_redo_slides_and_old_stores_keep_their_hash(tmp_path):
    from wsi_vssm.models.model_file import load_backbone
    from wsi_vssm.runs.jobs import extract_job

    slide = _slide(tmp_path / "s1.tif")
    out = tmp_path / "feat"
    assert _extract(slide, "--out", out, "--format", "pt", "--format", "zarr").exit_code == 0
    again = _extract(slide, "--out", out, "--format", "zarr", "--format", "pt", "--format", "pt")
    assert again.exit_code == 0 and "up to date" in again.stdout
    assert check_formats(["pt", "h5", "zarr", "h5"]) == FORMATS
    for bad in ([], ["hdf5"]):
        with pytest.raises(ValueError, match="feature formats"):
            check_formats(bad)
    backbone, info = load_backbone("micro")
    params = dict(mpp=2.0, token_px=32, region_px=256, overlap_px=64, min_tissue=0.0)
    job = extract_job(tmp_path, "micro", backbone, info, None, params)
    assert "formats" not in job.resolved  # stores extracted before --format existed are not redone
    assert extract_job(tmp_path, "micro", backbone, info, None, params, ("h5",)).params_hash != job.params_hash


def test_a_rerun_that_leaves_out_a_format_warns_that_its_old_file_may_hold_other_cells(tmp_path):
    slide = _slide(tmp_path / "s1.tif")
    out = tmp_path / "feat"
    first = _extract(slide, "--out", out, "--format", "zarr", "--format", "h5")
    assert first.exit_code == 0 and "left from an earlier run" not in first.output
    again = _extract(slide, "--out", out, "--format", "zarr")  # another hash: the slide is extracted again
    assert again.exit_code == 0, again.output
    assert "s1.h5: left from an earlier run (this run wrote zarr)" in again.output
    assert "add --format h5" in again.output and (out / "h5_files" / "s1.h5").exists()  # warned, not removed
    assert "pt_files" not in again.output  # no pt file was ever written


def test_a_file_in_the_way_of_h5_files_is_one_line_before_any_slide_runs(tmp_path, capsys):
    from conftest import run_cli_captured

    slide = _slide(tmp_path / "s1.tif")
    out = tmp_path / "feat"
    out.mkdir()
    (out / "h5_files").write_text("x")
    code, _, err = run_cli_captured(["extract", str(slide), "--out", str(out), "--format", "h5", *ARGS], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "h5_files is a file, not a folder" in err and "Traceback" not in err
    assert not (out / ".state").exists()  # refused before the model loaded or any slide ran


def test_a_damaged_pt_file_is_redone_and_an_earlier_formats_temporary_is_cleared(tmp_path):
    slide = _slide(tmp_path / "s1.tif")
    out = tmp_path / "feat"
    assert _extract(slide, "--out", out, "--format", "pt").exit_code == 0
    pt = out / "pt_files" / "s1.pt"
    pt.write_bytes(pt.read_bytes()[:100])
    (out / "h5_files").mkdir()
    left = out / "h5_files" / ".tmp-s1.h5.k1lld0ne"  # what a run with --format h5 killed mid-write leaves,
    left.write_bytes(b"partial")
    lock_path(out, "extract", "s1").write_text(json.dumps(  # with its lock (its pid gone)
        {"pid": 2**22 + 7, "host": socket.gethostname(), "time": "2026-12-07T00:00:00"}))
    redone = _extract(slide, "--out", out, "--format", "pt")
    assert redone.exit_code == 0 and "up to date" not in redone.stdout and feature_file_ok(pt, "pt")
    assert not left.exists()


def test_an_output_write_that_fails_is_tried_again_by_a_plain_rerun(tmp_path, monkeypatch):
    """A write refused in OUT (no permission, a file in the way) was recorded as the slide's failure, so after
    the folder was mended a rerun repeated the stale error until --retry-failed."""
    import errno

    import wsi_vssm.pipeline.feature_files as feature_files

    slide = _slide(tmp_path / "s1.tif")
    out = tmp_path / "feat"

    def refused(path, cells):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(feature_files, "_write_h5", refused)
    first = _extract(slide, "--out", out, "--format", "h5")
    assert first.exit_code == 1 and "cannot write its outputs" in first.stderr
    monkeypatch.undo()
    again = _extract(slide, "--out", out, "--format", "h5")
    assert again.exit_code == 0, again.output
    assert "earlier run" not in again.output and feature_file_ok(out / "h5_files" / "s1.h5", "h5")


def test_info_describes_each_feature_file_and_a_clam_h5(tmp_path, capsys):
    """`info` read a feature store as an OME-Zarr slide, an h5 as "not a slide format" and a pt as a model file."""
    import json

    from conftest import run_cli_captured

    slide = _slide(tmp_path / "s1.tif")
    out = tmp_path / "feat"
    assert _extract(slide, "--out", out, "--format", "zarr", "--format", "h5", "--format", "pt").exit_code == 0
    n = len(FeatureStore.open(out / "s1.zarr"))
    for path, kind in ((out / "s1.zarr", "feature store"), (out / "h5_files" / "s1.h5", "h5 feature file"),
                       (out / "pt_files" / "s1.pt", "pt feature file")):
        code, text, _ = run_cli_captured(["info", path], capsys)
        assert code == 0 and kind in text and f"{n} x 256 features" in text
        code, text, _ = run_cli_captured(["info", "--json", path], capsys)
        report = json.loads(text)
        assert code == 0 and report["cells"] == n and report["features"] == 256
    assert report["kind"] == "pt" and "model_id" not in report
    clam = tmp_path / "clam.h5"  # as CLAM writes it: two datasets, the patch size on coords
    with h5py.File(clam, "w") as f:
        f.create_dataset("features", data=np.zeros((5, 1024), np.float32))
        f.create_dataset("coords", data=np.zeros((5, 2), np.int64)).attrs["patch_size"] = 256
    code, text, _ = run_cli_captured(["info", clam], capsys)
    assert code == 0 and "5 x 1024 features" in text and "patch_size 256" in text
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("images", data=np.zeros(3))
    code, _, err = run_cli_captured(["info", other], capsys)
    assert code == 1 and "without a `features` dataset" in err and err.count("\n") == 1


def test_info_loads_a_pt_feature_file_once(tmp_path, capsys, monkeypatch):
    """`info x.pt` loaded the tensor to tell its kind and again to describe it (left alone since 2026-12-05)."""
    import torch
    from conftest import run_cli_captured

    path = tmp_path / "s1.pt"
    torch.save(torch.zeros(7, 256), path)
    loads, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    code, text, _ = run_cli_captured(["info", path], capsys)
    assert code == 0 and "7 x 256 features" in text and len(loads) == 1
    torch.save(torch.zeros(9, 256), path)  # rewritten: read afresh, not the remembered tensor
    code, text, _ = run_cli_captured(["info", path], capsys)
    assert code == 0 and "9 x 256 features" in text and len(loads) == 2


def test_info_out_says_which_files_each_extracted_slide_went_to(tmp_path, capsys):
    """`info OUT` said only "done" for an extract slide: which of zarr / h5 / pt holds its cells was not told."""
    import json

    from conftest import run_cli_captured

    slide = _slide(tmp_path / "s1.tif")
    out = tmp_path / "feat"
    assert _extract(slide, "--out", out, "--format", "pt", "--format", "h5").exit_code == 0
    n = len(torch.load(out / "pt_files" / "s1.pt", weights_only=True))
    code, text, _ = run_cli_captured(["info", out], capsys)
    assert code == 0 and f"s1 (extract): done: {n} cells in h5, pt" in text
    code, text, _ = run_cli_captured(["info", "--json", out], capsys)
    assert json.loads(text)["slides"][0]["formats"] == ["h5", "pt"]


def test_info_flags_h5_and_pt_shapes_a_bag_loader_would_misread(tmp_path, capsys):
    """Foreign files: features of shape (1, N, F) were counted as one cell, and an h5 without `coords`, or with
    coords of another length, or with no cells at all, passed unflagged."""
    import json

    from conftest import run_cli_captured

    def h5(name, features, coords):
        path = tmp_path / name
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=features)
            if coords is not None:
                f.create_dataset("coords", data=coords)
        return path

    cases = [
        (h5("batched.h5", np.zeros((1, 6, 8), np.float32), np.zeros((6, 2))), 6, "a leading batch axis"),
        (h5("nocoords.h5", np.zeros((6, 8), np.float32), None), 6, "no `coords` dataset"),
        (h5("short.h5", np.zeros((6, 8), np.float32), np.zeros((4, 2))), 6, "coords have shape [4, 2] for 6 cells"),
        (h5("empty.h5", np.zeros((0, 8), np.float32), np.zeros((0, 2))), 0, "an empty bag"),
        (h5("flat.h5", np.zeros(8, np.float32), np.zeros((8, 2))), None, "not (cells, features)"),
    ]
    torch.save(torch.zeros(1, 5, 8), tmp_path / "batched.pt")
    cases.append((tmp_path / "batched.pt", 5, "a leading batch axis"))
    for path, cells, says in cases:
        code, text, _ = run_cli_captured(["info", path], capsys)
        assert code == 0 and any(ln.startswith("warning:") and says in ln for ln in text.splitlines()), text
        code, out, _ = run_cli_captured(["info", "--json", path], capsys)
        report = json.loads(out)
        assert report["cells"] == cells and any(says in n for n in report["notes"]), (path, report)
    grouped = tmp_path / "grouped.h5"  # coords as a group: a traceback before
    with h5py.File(grouped, "w") as f:
        f.create_dataset("features", data=np.zeros((6, 8), np.float32))
        f.create_group("coords")
    code, text, _ = run_cli_captured(["info", grouped], capsys)
    assert code == 0 and "warning:      `coords` is a group" in text
    good = h5("good.h5", np.zeros((6, 8), np.float32), np.zeros((6, 2)))
    code, text, _ = run_cli_captured(["info", good], capsys)
    assert code == 0 and "6 x 8 features" in text and "warning" not in text


def test_extract_warns_of_a_slide_without_cells(tmp_path):
    """A slide with no tissue was written as 0-row h5 / pt files without a word (CLAM fails later on the empty
    bag, far from the cause)."""
    blank = tmp_path / "blank.tif"
    tifffile.imwrite(blank, np.full((320, 384, 3), 245, np.uint8), tile=(128, 128), photometric="rgb",
                     resolution=(1e4 / 2.0, 1e4 / 2.0), resolutionunit="CENTIMETER")
    out = tmp_path / "feat"
    res = _extract(blank, _slide(tmp_path / "s1.tif"), "--out", out, "--format", "h5", "--min-tissue", "0.25")
    assert res.exit_code == 0, res.output
    with h5py.File(out / "h5_files" / "blank.h5", "r") as f:
        assert f["features"].shape[0] == 0
    warned = [line for line in res.stderr.splitlines() if "no cells" in line]
    assert len(warned) == 1 and str(blank) in warned[0] and "empty bag" in warned[0]


def test_a_store_records_its_slide_by_absolute_path(tmp_path, monkeypatch):
    """`extract s1.tif` from the slide's folder recorded `slide_path: "s1.tif"`, which names nothing once the
    store is read from anywhere else (train mil's folder, another machine's mount)."""
    _slide(tmp_path / "s1.tif")
    monkeypatch.chdir(tmp_path)
    assert _extract("s1.tif", "--out", "feat").exit_code == 0
    assert FeatureStore.open(tmp_path / "feat" / "s1.zarr").attrs["slide_path"] == str(tmp_path / "s1.tif")


def test_info_out_flags_slides_extracted_with_different_settings(tmp_path, capsys):
    """A folder filled by two extract runs of other regions was listed as all done, alike; train mil then mixed
    them (it warns since 2026-12-06), and a folder of two models' stores was found only when training refused."""
    import json

    from conftest import run_cli_captured

    from wsi_vssm.commands.extract import command

    out = tmp_path / "feat"
    for name, region in (("s1", "256"), ("s2", "128")):
        args = [str(_slide(tmp_path / f"{name}.tif")), "--out", str(out), *ARGS[:-6], "--region-px", region,
                "--overlap-px", "64", "--min-tissue", "0", "--device", "cpu"]
        assert CliRunner().invoke(command, args).exit_code == 0
    code, text, _ = run_cli_captured(["info", out], capsys)
    said = [line for line in text.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(said) == 1 and "different region_px: 128 (1), 256 (1)" in said[0], text
    code, text, _ = run_cli_captured(["info", "--json", out], capsys)
    assert json.loads(text)["mixed_settings"] == {"region_px": {"128": 1, "256": 1}}
    assert _extract(_slide(tmp_path / "s3.tif"), "--out", tmp_path / "alike").exit_code == 0
    assert _extract(_slide(tmp_path / "s4.tif"), "--out", tmp_path / "alike").exit_code == 0
    code, text, _ = run_cli_captured(["info", tmp_path / "alike"], capsys)
    assert code == 0 and "warning" not in text


def test_extract_takes_the_slide_reader_as_predict_does(tmp_path):
    """`extract` had no --backend (predict, evaluate and info have it; docs/formats.md advises tifffile for
    speed on some files): the most read-bound command could not choose its reader."""
    from wsi_vssm.runs.state import read_state

    slide = _slide(tmp_path / "s1.tif")
    res = _extract(slide, "--out", tmp_path / "feat", "--backend", "tifffile")
    assert res.exit_code == 0, res.output
    assert read_state(tmp_path / "feat", "extract", "s1")["params"]["backend"] == "tifffile"
    res = _extract(slide, "--out", tmp_path / "feat2", "--backend", "zarr")  # not an OME-Zarr: fails alone
    assert res.exit_code != 0 and "s1.tif" in res.stderr and "Traceback" not in res.output
    assert _extract(slide, "--out", tmp_path / "feat3").exit_code == 0  # auto: the hash stores had before
    assert "backend" not in read_state(tmp_path / "feat3", "extract", "s1")["params"]


def test_info_on_a_feature_file_folder_says_what_it_holds(tmp_path, capsys):
    """`info OUT/pt_files` called extract's feature tensors "a folder of training outputs ... model files", and
    `info OUT/h5_files` found "no slide files"."""
    from conftest import run_cli_captured

    slide = _slide(tmp_path / "s1.tif")
    out = tmp_path / "feat"
    assert _extract(slide, "--out", out, "--format", "h5", "--format", "pt").exit_code == 0
    for fmt in ("h5", "pt"):
        code, _, err = run_cli_captured(["info", str(out / f"{fmt}_files")], capsys)
        assert code == 1 and err.count("\n") == 1, err
        assert f"a folder of 1 {fmt} feature file(s) of `wsi-vssm extract` (s1.{fmt}), not a slide" in err
    # feature stores copied out of an extract folder (no .state): the folder `train mil` reads, not "no slides"
    import shutil

    assert _extract(slide, "--out", out).exit_code == 0
    (tmp_path / "stores").mkdir()
    shutil.copytree(out / "s1.zarr", tmp_path / "stores" / "s1.zarr")
    code, _, err = run_cli_captured(["info", str(tmp_path / "stores")], capsys)
    assert code == 1 and err.count("\n") == 1 and ("a folder of 1 feature store(s) of `wsi-vssm extract` "
                                                    "(s1.zarr), not a slide") in err, err
    assert "`wsi-vssm train mil` reads the folder" in err
